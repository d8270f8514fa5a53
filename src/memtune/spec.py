"""Method specs: the one parser behind `memtune compare --methods` and `memtune plan --methods`.

    method[:key=value[:key=value]][+technique[+technique]]

    lora                      the method with its defaults
    lora:r=16:alpha=32        options after ':' (key=value; a value may hold ',' as in keep_layers=1,2,3)
    lora+nf4+gc               memory techniques after '+' (gc, nf4, fp4, int8, offload, chunked_ce; '+' never
                              appears in an option value)

A list of specs is comma-separated, and commas also separate the items of a tuple option, so a comma
starts a new spec only where what follows is a registered method name followed by ':', '+', ',' or the
end: `lst:keep_layers=1,2,3,lora+gc` is two specs. Every spec is checked before anything runs: the
method name, the option names and values (through the method's own config) and the techniques
(through `memtune.techniques`), each failure one `ConfigError` line.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MethodSpec:
    label: str                                  # the spec as given (JSON records and tables carry it)
    method: str
    options: dict = field(default_factory=dict)
    techniques: tuple[str, ...] = ()            # in the order given, e.g. ("nf4", "gc")

    @property
    def run_name(self) -> str:
        """A folder name for the run: the label with ':' → '_' and '=' → '-' (',' and '+' are kept)."""
        return self.label.replace(":", "_").replace("=", "-")


def _config_error(message: str):
    from .methods.base import ConfigError

    return ConfigError(message)


def _method_names() -> list[str]:
    from .methods import METHODS

    return list(METHODS)


def split_specs(text: str, methods=None) -> list[str]:
    """'lst:keep_layers=1,2,3,lora+gc' → ['lst:keep_layers=1,2,3', 'lora+gc'] (see the module doc)."""
    names = sorted(methods if methods is not None else _method_names(), key=len, reverse=True)
    starts = re.compile(r"(?:" + "|".join(re.escape(n) for n in names) + r")(?=[:+,]|\s*$)") if names else None
    pieces: list[str] = []
    for piece in text.split(","):
        stripped = piece.strip()
        if not stripped:
            continue
        prev = pieces[-1] if pieces else None
        # Only an option value can continue ('keep_layers=1,2,3'); after a bare name or a technique, a piece
        # that is no method name still starts a spec, so that `validate_spec` names it as unknown.
        in_value = prev is not None and "+" not in prev and "=" in prev.rsplit(":", 1)[-1]
        if in_value and not (starts is not None and starts.match(stripped)):
            pieces[-1] = prev + "," + stripped
        else:
            pieces.append(stripped)
    return [p.strip() for p in pieces if p.strip()]


def _leading_method(label: str) -> str:
    """The method name a spec starts with: the longest registered name followed by ':', '+' or the end
    (a name may itself end in '+', as DTL's 'dtl+' does), else everything before the first ':' or '+'."""
    for name in sorted(_method_names(), key=len, reverse=True):
        if label.startswith(name) and label[len(name):len(name) + 1] in ("", ":", "+"):
            return name
    return re.split(r"[:+]", label, maxsplit=1)[0]


def parse_spec(text: str) -> MethodSpec:
    """One spec → MethodSpec; syntax only (names and values are checked by `validate_spec`)."""
    label = text.strip()
    if not label:
        raise _config_error("empty method spec; write e.g. lora, lora:r=16 or lora+gc")
    method = _leading_method(label)
    rest = label[len(method):]
    head, *techniques = rest.split("+")
    opts = head.split(":")[1:] if head.startswith(":") else ([head] if head else [])
    method = method.strip()
    options: dict[str, str] = {}
    for o in opts:
        if "=" not in o:
            raise _config_error(f"method spec {label!r}: options must be key=value (e.g. sherl:late_layers=2)")
        k, v = o.split("=", 1)
        if not k.strip():
            raise _config_error(f"method spec {label!r}: an option has no name before '='")
        if k.strip() in options:
            raise _config_error(f"method spec {label!r}: option {k.strip()!r} given twice")
        options[k.strip()] = v.strip()
    return MethodSpec(label, method, options, tuple(t.strip() for t in techniques))


def validate_spec(spec: MethodSpec) -> MethodSpec:
    """Method name, options and techniques all valid, or ConfigError saying what is allowed."""
    from .methods import METHODS, config_for
    from .techniques import MemoryTechniques

    if spec.method not in METHODS:
        where = f" in {spec.label!r}" if spec.label != spec.method else ""
        raise _config_error(f"unknown method {spec.method!r}{where}; available: {', '.join(METHODS)}")
    config_for(spec.method, spec.options)                 # bad option names or values fail here
    MemoryTechniques.from_names(spec.techniques, where=spec.label).check_method(spec.method)
    return spec


def with_techniques(specs: list[str], names) -> list[str]:
    """Add techniques (e.g. from `--quantize nf4`) to every spec that does not name them already."""
    out = []
    for text in specs:
        have = parse_spec(text).techniques
        out.append(text + "".join(f"+{n}" for n in names if n not in have))
    return out


def parse_specs(methods) -> list[MethodSpec]:
    """A comma list (str) or a list of spec strings → validated MethodSpecs, in order."""
    if isinstance(methods, str):
        methods = split_specs(methods)
    specs = [validate_spec(parse_spec(m)) for m in methods]
    if not specs:
        raise _config_error(f"no methods given; available: {', '.join(_method_names())}")
    return specs

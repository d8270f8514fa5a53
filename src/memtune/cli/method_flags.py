"""`memtune train`'s method list and method-option flags, generated from the registered method configs.

Every option of every method config is one `--name` flag (value V, parsed by the method's own config), whose
help lists the methods that have the option, each with its description: the field's `metadata["help"]` or,
failing that, the config docstring's, where options are documented as a two-column list (`name   what it
does`, continuation lines indented further):

    r                 reduction factor: side width d' = d/r, ...
    lam, beta         coupling factors; None takes ...
    cache_*           the trunk cache ...

The method list shows each config class docstring's first line.
"""
from __future__ import annotations

import dataclasses
import inspect
import re

# "name", "a, b" or "prefix_*", then two or more spaces, then the description.
_ENTRY = re.compile(r"^(?P<indent>\s*)(?P<names>[a-z_][a-z0-9_]*\*?(?:, [a-z_][a-z0-9_]*\*?)*)\s{2,}(?P<text>\S.*)$")


def _registry() -> dict:
    from ..methods import METHODS

    return METHODS


def _dest(option: str) -> str:
    return f"opt__{option}"


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def method_option_fields() -> dict[str, set[str]]:
    """Every method option name → the methods that have it."""
    fields: dict[str, set[str]] = {}
    for name, cls in _registry().items():
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, set()).add(name)
    return fields


def add_method_option_flags(parser) -> None:
    group = parser.add_argument_group("method options (each applies to the methods that have it)")
    for option, methods in sorted(method_option_fields().items()):
        group.add_argument(_flag(option), dest=_dest(option), default=None, metavar="V",
                           help=option_help(option, sorted(methods), _registry()))


def method_options(ns, method: str) -> dict[str, str]:
    """The method-option flags given (option → text), each one an option of `method`, else ConfigError."""
    from ..methods import ConfigError

    registry = _registry()
    fields = method_option_fields()
    options = {name: getattr(ns, _dest(name)) for name in fields if getattr(ns, _dest(name)) is not None}
    if method not in registry:
        raise ConfigError(f"unknown method {method!r}; available: {', '.join(registry)}")
    wrong = [k for k in options if method not in fields[k]]
    if wrong:
        own = [f.name for f in dataclasses.fields(registry[method])]
        raise ConfigError(f"option(s) {', '.join(_flag(w) for w in wrong)} do not apply to method {method!r}; "
                          f"its options: {', '.join(_flag(o) for o in own) or 'none'}")
    return options


def first_line(cls) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def documented_options(cls) -> dict[str, str]:
    """Option name (or `prefix_*`) → its description, from the docstrings of `cls` and its bases."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = klass.__dict__.get("__doc__")
        if not doc:
            continue
        entries: list[tuple[list[str], list[str], int]] = []
        for line in inspect.cleandoc(doc).splitlines():
            m = _ENTRY.match(line)
            if m and (not entries or len(m["indent"]) <= entries[-1][2]):
                entries.append(([n.strip() for n in m["names"].split(",")], [m["text"].strip()], len(m["indent"])))
            elif entries and line.strip() and len(line) - len(line.lstrip()) > entries[-1][2]:
                entries[-1][1].append(line.strip())     # continuation of the previous entry
            elif entries and not line.strip():
                continue
            elif entries:
                entries.append(([], [], entries[-1][2]))  # prose ends the list entry before it
        for names, text, _ in entries:
            for name in names:
                found[name] = " ".join(text)
    return found


def _sentence(text: str, limit: int = 160) -> str:
    """The first sentence (up to a '.' or ';' outside parentheses) of a description, at most `limit` chars."""
    depth, end = 0, len(text)
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch in ".;" and depth <= 0 and (i + 1 == len(text) or text[i + 1] == " "):
            end = i + (ch == ".")
            break
    text = text[:end].rstrip(" ;,")
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _description(cls, field: dataclasses.Field) -> str:
    if field.metadata.get("help"):
        return field.metadata["help"]
    docs = documented_options(cls)
    return docs.get(field.name) or next(
        (t for k, t in docs.items() if k.endswith("*") and field.name.startswith(k[:-1])), "")


def option_help(option: str, methods: list[str], registry: dict) -> str:
    """`[applies to: a, b] a: description (default x). b: ...` for one method-option flag."""
    parts = []
    for method in methods:
        cls = registry[method]
        field = next(f for f in dataclasses.fields(cls) if f.name == option)
        default = field.default if field.default is not dataclasses.MISSING else None
        text = _description(cls, field)
        type_name = getattr(field.type, "__name__", None) or str(field.type)
        parts.append((method, _sentence(text) if text else type_name, default))
    # Methods that describe the option alike are listed together.
    grouped: dict[tuple[str, object], list[str]] = {}
    for method, text, default in parts:
        grouped.setdefault((text, default), []).append(method)
    if len(grouped) == 1:                           # every method describes it alike: no per-method prefix
        (text, default), = grouped
        return f"[applies to: {', '.join(methods)}] {text} (default {default})"
    described = [f"{', '.join(ms)}: {text} (default {default})"
                 for (text, default), ms in grouped.items()]
    return f"[applies to: {', '.join(methods)}] " + "; ".join(described)


def methods_listing(registry: dict) -> str:
    width = max(len(name) for name in registry)
    return "methods (--method):\n" + "\n".join(f"  {name:<{width}}  {first_line(cls)}" for name, cls in registry.items())

"""What is fastest that fits: every method × memory technique at its largest batch under the budget.

    rec = recommend(PlanSettings(model="llama-7b", max_length=2048, budget_bytes=24 * GIB), profile="h100")
    rec.best.label, rec.best.max_batch_size, rec.best.time_per_example_s

Each method is planned as it is, then with the techniques that can change the answer for it: gradient
checkpointing (`gc`) unless its weights and optimizer state alone exceed the budget, and 4-bit `nf4` / 8-bit
`int8` frozen weights (each also with `gc`; rows are method specs such as `lora+nf4+gc`, see `memtune.spec`)
where the frozen weights take over a quarter of the budget or not even one example fits; for a causal-LM or
seq2seq objective each of those, and the method alone, also with the chunked loss (`+chunked_ce`). On a modelled GPU,
when the caller did not fix the precision, the search repeats with bf16 weights (`precision="bf16"`: weights,
gradients and optimizer state in bf16; rows labelled `@bf16`). Every row gets its largest
batch under the budget, the predicted step time there (`memory.step_time`: counted FLOPs and bytes on the
device profile) and the time per example; the fitting row with the least time per example is the
recommendation (`recommended = True`). Rows whose technique changed nothing (checkpointing a side method whose
trunk runs without grad) are dropped, and a technique a method refuses is reported as that row's status.

Accuracy: where a committed benchmark of this repository measured the method (benchmarks/*/results.json:
MiniLM on Rotten Tomatoes, DINOv2-S on Fashion-MNIST), the row carries that accuracy and names its file. It
is the method's accuracy on that task and model, a hint of the method family's quality, not a prediction for
this model.

Deep models are planned with depth extrapolation (`layers=k`, default 2 for models deeper than 8 blocks):
plans at k and 2k blocks, linear per block, which is exact for methods that repeat per block and conservative
for DTL and SHERL (their depth-dependent defaults plan up to 15 % high); the result says so.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..methods import METHODS, ConfigError

DEFAULT_METHODS = ("full", "lora", "adapter", "lst", "dtl", "sherl", "meft1", "qst")
SEARCH_LAYERS = 2
DEEP = 8
BENCHMARKS = ("minilm-rotten-tomatoes", "dinov2s-fashion-mnist")


@dataclass
class Recommendation:
    result: object                       # a PlanResult whose `methods` are all searched rows
    best: object | None                  # the recommended MethodPlan (None: nothing fits)
    techniques: list
    notes: list = field(default_factory=list)
    accuracy_sources: list = field(default_factory=list)


def _available_quantizers() -> list[str]:
    """Quantized frozen weights the technique registry offers (none before it exists)."""
    try:
        from ..techniques import MemoryTechniques
    except ImportError:
        return []
    out = []
    for quant in ("nf4", "int8"):
        try:
            MemoryTechniques.from_names((quant,), where="recommend")
        except (ConfigError, ValueError, KeyError):
            continue
        out.append(quant)
    return out


def _spec(method: str, techniques: tuple[str, ...]) -> str:
    return "+".join((method, *techniques))


def benchmark_accuracy(root: Path | None = None) -> tuple[dict, list[str]]:
    """method label → {benchmark: accuracy} from the committed benchmark results, and the files read."""
    root = root or Path(__file__).resolve().parents[3] / "benchmarks"
    out: dict[str, dict] = {}
    sources = []
    for name in BENCHMARKS:
        path = root / name / "results.json"
        if not path.is_file():
            continue
        try:
            records = json.loads(path.read_text())["records"]
        except (OSError, ValueError, KeyError):
            continue
        sources.append(f"benchmarks/{name}/results.json")
        for r in records:
            if r.get("accuracy") is not None:
                out.setdefault(r["label"], {})[name] = r["accuracy"]
    return out, sources


def _accuracy_for(row, table: dict) -> dict | None:
    """The committed accuracy of the row's method (techniques do not change what is trained)."""
    method_label = row.label.split("+")[0]
    for key in (method_label, row.method, "meft1" if row.method == "meft" else None):
        if key and key in table:
            return table[key]
    return None


def recommend(settings, methods=None, profile: str | None = None, precision_fixed: bool = False,
              benchmarks_root: Path | None = None, config=None, source=None) -> Recommendation:
    """Plan every method × technique at its largest batch under `settings.budget_bytes`; mark the fastest."""
    from .plan import plan

    if settings.budget_bytes is None:
        raise ConfigError("a recommendation needs a budget (--budget, e.g. 24GiB)")
    names = [m for m in (methods or DEFAULT_METHODS) if m.split(":")[0].split("+")[0] in METHODS]
    settings = replace(settings, device_profile=profile or settings.device_profile)
    notes = []
    if settings.layers is None:
        from .compositions import depth
        from .known_configs import resolve_config

        cfg = config if config is not None else resolve_config(settings.model)[0]
        if depth(cfg) > DEEP:
            settings = replace(settings, layers=SEARCH_LAYERS)
            notes.append(f"searched with depth extrapolation (plans at {SEARCH_LAYERS} and {2 * SEARCH_LAYERS} "
                         "blocks, linear per block): exact for methods that repeat per block, up to 15 % high "
                         "for DTL and SHERL")
    quantizers = _available_quantizers()
    lm = _predicts_tokens(settings, config)
    precisions = [settings.precision]
    if not precision_fixed and settings.precision == "fp32" and settings.device == "cuda":
        precisions.append("bf16")
    budget = settings.budget_bytes
    rows, base, refused = [], None, []
    for precision in precisions:
        s = replace(settings, precision=precision)
        # Pass 1: every method as it is. Pass 2: the techniques that can change the answer for it.
        plain = plan(s, names, config=config, source=source)
        base = base or plain
        second = []
        for m in plain.methods:
            if m.status != "ok":
                continue
            frozen = m.parameter_bytes - m.gradient_bytes
            combos = [("gc",)] if m.start_bytes < budget else []
            if quantizers and (frozen > budget / 4 or not m.max_batch_size):
                combos += [combo for q in quantizers for combo in ((q,), (q, "gc"))]
            if lm:                  # the same loss without the N×V logits: with every combination, and alone
                combos += [(*combo, "chunked_ce") for combo in [(), *combos]]
            second += [_spec(m.label, combo) for combo in combos]
        specs, bad = _valid_specs(second)
        seen = {m.label for m in refused}
        refused += [m for m in bad if m.label not in seen]       # the same refusals at every precision
        more = plan(s, specs, config=config, source=source).methods if specs else []
        for m in plain.methods + more:
            if precision != settings.precision:
                m.label = f"{m.label}@{precision}"
                m.notes.append(f"weights, gradients and optimizer state in {precision}")
            rows.append(m)
    rows = _drop_no_ops(rows) + refused
    mark_fastest(rows)
    table, sources = benchmark_accuracy(benchmarks_root)
    for m in rows:
        m.benchmark_accuracy = _accuracy_for(m, table) if m.status == "ok" else None
    out = copy.copy(base)
    out.methods = rows
    best = next((m for m in rows if m.recommended), None)
    techniques = (["gc", *quantizers] + (["chunked_ce"] if lm else [])
                  + (["bf16 weights"] if len(precisions) > 1 else []))
    return Recommendation(out, best, techniques, notes, sources)


def _predicts_tokens(settings, config) -> bool:
    """Whether the planned objective has a vocabulary-wide loss (causal LM, seq2seq), where chunked_ce applies."""
    from .known_configs import resolve_config
    from .plan_step import objective_of

    cfg = config if config is not None else resolve_config(settings.model)[0]
    return objective_of(cfg, settings) in ("causal-lm", "seq2seq")


def _valid_specs(specs: list[str]):
    """Specs every check accepts, and a row per refused combination (a method that refuses a technique)."""
    from ..spec import parse_spec, validate_spec
    from .plan_types import MethodPlan

    ok, refused = [], []
    for text in specs:
        try:
            spec = validate_spec(parse_spec(text))
        except ConfigError as e:
            refused.append(MethodPlan(label=text, method=text.split("+")[0], options={}, status="unsupported",
                                      message=str(e), recommended=False))
            continue
        ok.append(spec.label)
    return ok, refused


def _drop_no_ops(rows):
    """Drop rows whose checkpointing did nothing (the method's blocks run without grad): a duplicate."""
    kept = []
    for m in rows:
        if m.status == "ok" and "gc" in m.label.split("@")[0].split("+")[1:] and m.gradient_checkpointing != "applied":
            continue
        kept.append(m)
    return kept


def mark_fastest(rows) -> None:
    """time_vs_full against plain full at the same precision and batch; the fastest fitting row recommended."""
    full = {}
    for m in rows:
        if m.status == "ok" and m.label.split("@")[0] == "full":
            full[m.label.partition("@")[2]] = m
    for m in rows:
        ref = full.get(m.label.partition("@")[2])
        if m.status == "ok" and ref is not None and ref.step_time_s:
            m.time_vs_full = m.step_time_s / ref.step_time_s
        m.recommended = False
    fitting = [m for m in rows if m.status == "ok" and m.max_batch_size and m.time_per_example_s]
    if fitting:
        min(fitting, key=lambda m: m.time_per_example_s).recommended = True

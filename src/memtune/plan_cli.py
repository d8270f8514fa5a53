"""`memtune plan`: will this fit on my GPU? Every method's training-step memory, planned without weights.

    memtune plan --model t5-base --methods full,lora,lst --batch-size 100 --max-length 128 --budget 24GiB

Prints one row per method (GiB = 2^30 bytes): trainable parameters, weights, gradients, optimizer
state, activation peak (peak − memory at the step's start), total peak, whether it fits the budget and
the largest batch that does. `--json PATH` writes every figure in bytes.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

GIB = 2 ** 30
_UNITS = {"": GIB, "b": 1, "k": 2 ** 10, "kib": 2 ** 10, "kb": 10 ** 3, "m": 2 ** 20, "mib": 2 ** 20, "mb": 10 ** 6,
          "g": GIB, "gib": GIB, "gb": 10 ** 9, "t": 2 ** 40, "tib": 2 ** 40, "tb": 10 ** 12}


def parse_budget(text: str) -> int:
    """'16GiB', '24 GiB', '80' (GiB), '16000MiB', '40GB' (10^9 bytes) → bytes."""
    from .methods import ConfigError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ConfigError(f"--budget: cannot read {text!r}; write e.g. 16GiB, 24GiB, 80 (GiB), 16000MiB or 40GB "
                          "(GB = 10^9 bytes)")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ConfigError(f"--budget must be > 0, got {text!r}")
    return int(value)


def add_plan_parser(sub) -> None:
    from .memory.plan import ATTENTION, OPTIMIZERS, PRECISIONS

    p = sub.add_parser("plan", help="estimate each method's training-step memory without weights (meta device)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="known name (t5-base, t5-3b, bert-base, llama-7b, minilm, ...; an "
                                                  "unknown name lists them all), a config.json or model folder, "
                                                  "or a hub id")
    p.add_argument("--methods", default=None,
                   help="comma list of methods (default full,lora,adapter,bitfit,lst; with --budget and no "
                        "--methods, every method × memory technique is searched and the fastest that fits "
                        "is recommended); name:key=value adds options (e.g. lst:r=16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128, help="text: tokens per sequence (padded to exactly this)")
    p.add_argument("--image-size", type=int, default=None, help="vision: pixels per side (default: the model's)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32; bf16 = bf16 weights; *-amp = fp32 weights + autocast")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="sgd = SGD with momentum 0.9")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the blocks that the backward pass goes through")
    p.add_argument("--attn", choices=ATTENTION, default="eager",
                   help="eager (as the papers) or sdpa (modelled as a fused GPU kernel)")
    p.add_argument("--budget", default=None, help="GPU memory to fit, e.g. 16GiB, 24GiB, 80GiB")
    p.add_argument("--num-labels", type=int, default=2, help="classification classes")
    p.add_argument("--objective", choices=["auto", "classification", "causal-lm"], default="auto",
                   help="auto: causal LM for decoders, classification otherwise")
    p.add_argument("--target-length", type=int, default=1, help="T5: decoder positions per example")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="what to model: a GPU (default) or this CPU (optimizer and autocast defaults differ)")
    p.add_argument("--layers", type=int, default=None,
                   help="plan at N and 2N blocks and extrapolate per block (faster for deep models)")
    p.add_argument("--json", default=None, help="write the plan here (bytes and GiB)")
    from .memory.devices import PROFILE_NAMES
    from .memory.sharding import SCHEMES

    p.add_argument("--device-profile", default=None, metavar="NAME",
                   help=f"device for predicted step times: {', '.join(PROFILE_NAMES)} (default: cpu with "
                        "--device cpu, else h100; cpu is measured on this machine once and cached)")
    p.add_argument("--num-gpus", type=int, default=1, help="data-parallel GPUs (--batch-size is per GPU)")
    p.add_argument("--sharding", choices=SCHEMES, default=None,
                   help="how N GPUs split the model state (default ddp with --num-gpus > 1)")


def settings_from_args(ns):
    from .memory.plan import PlanSettings

    return PlanSettings(
        model=ns.model, batch_size=ns.batch_size, max_length=ns.max_length, image_size=ns.image_size,
        precision=ns.precision or "fp32", optimizer=ns.optimizer, gradient_checkpointing=ns.gradient_checkpointing,
        attn=ns.attn, budget_bytes=parse_budget(ns.budget) if ns.budget is not None else None,
        num_labels=ns.num_labels, objective=ns.objective, target_length=ns.target_length, device=ns.device,
        layers=ns.layers, device_profile=ns.device_profile,
    )


def _gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def format_plan(result) -> str:
    """The human-readable table (GiB) with a header naming the workload."""
    s = result.settings
    shape = (f"image {s.image_size or '(default)'} px → {result.tokens} tokens" if result.model_type in
             ("vit", "dinov2") else f"length {s.max_length}")
    lines = [
        f"memtune plan: {s.model} ({result.model_source}, {result.model_type}, {result.num_layers} layers), "
        f"batch {s.batch_size}, {shape}, {s.precision}, {s.optimizer}, attention {s.attn}"
        + (", gradient checkpointing" if s.gradient_checkpointing else "")
        + (f", budget {s.budget_bytes / GIB:.2f} GiB" if s.budget_bytes else ""),
        "GiB = 2^30 bytes; peak = what torch.cuda.max_memory_allocated() reports for one training step; "
        "reserved memory runs 1-30 % higher and the CUDA context adds about 0.5 GiB: keep that headroom.",
        "",
    ]
    head = ["method", "trainable", "%", "params", "grads", "optim", "act peak", "peak"]
    if s.budget_bytes:
        head += ["fits", "max batch"]
    rows = []
    for m in result.methods:
        if m.status != "ok":
            rows.append([m.label, f"{m.status}: {m.message}"])
            continue
        row = [m.label, _count(m.trainable_params), f"{m.trainable_pct:.2f}", _gib(m.parameter_bytes),
               _gib(m.gradient_bytes), _gib(m.optimizer_bytes), _gib(m.activation_peak_bytes), _gib(m.peak_bytes)]
        if s.budget_bytes:
            row += ["yes" if m.fits else "no", "none" if m.max_batch_size == 0 else str(m.max_batch_size)]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [head] + [r for r in rows if len(r) == len(head)]) for i in
              range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines.append(fmt(head))
    for r in rows:
        lines.append(fmt(r) if len(r) == len(head) else f"{str(r[0]).ljust(widths[0])}  {r[1]}")
    notes = []
    for m in result.methods:
        if s.gradient_checkpointing and m.status == "ok" and m.gradient_checkpointing != "applied":
            notes.append(f"{m.label}: gradient checkpointing {m.gradient_checkpointing}"
                         + (" (its backbone runs without grad)" if m.gradient_checkpointing == "not needed" else
                            " (the method does not run blocks through the backbone protocol)"))
        notes += [f"{m.label}: {n}" for n in m.notes]
    if notes:
        lines += ["", *notes]
    if s.budget_bytes:
        lines += ["", budget_summary(result)]
    lines.append(f"planned in {result.seconds:.1f} s")
    return "\n".join(lines)


def budget_summary(result) -> str:
    s = result.settings
    ok = [m for m in result.methods if m.status == "ok"]
    budget = s.budget_bytes / GIB
    if not ok:
        return "No method could be planned for this model (see the messages above)."
    fitting = [m for m in ok if m.fits]
    if fitting:
        return (f"Fits in {budget:.2f} GiB at batch {s.batch_size}: " + ", ".join(m.label for m in fitting) + ".")
    some = [m for m in ok if m.max_batch_size]
    if some:
        best = max(some, key=lambda m: m.max_batch_size)
        return (f"Nothing fits in {budget:.2f} GiB at batch {s.batch_size}; smaller batches do: "
                + ", ".join(f"{m.label} up to {m.max_batch_size}" for m in some)
                + f" (largest: {best.label}).")
    low = min(ok, key=lambda m: m.peak_bytes)
    return (f"Nothing fits in {budget:.2f} GiB, even at batch size 1: the smallest peak at batch {s.batch_size} "
            f"is {low.peak_bytes / GIB:.2f} GiB ({low.label}), and weights + optimizer state alone need "
            f"{low.start_bytes / GIB:.2f} GiB. Try bf16 weights, --gradient-checkpointing, a shorter "
            "--max-length, a side-network method, or a larger GPU.")


def cmd_plan(ns) -> int:
    from .memory.plan import plan
    from .plan_report import format_step_times

    settings = settings_from_args(ns)
    if ns.num_gpus < 1:
        from .methods import ConfigError

        raise ConfigError(f"--num-gpus must be >= 1, got {ns.num_gpus}")
    search = settings.budget_bytes is not None and ns.methods is None and ns.num_gpus == 1
    extra = {}
    if search:                   # "what is fastest that fits?": every method × technique, the fastest marked
        from .memory.recommend import recommend
        from .plan_report import format_recommendation

        rec = recommend(settings, precision_fixed=ns.precision is not None)
        result = rec.result
        print(format_recommendation(rec).lstrip("\n"))
        extra["recommendation"] = {"recommended": rec.best.label if rec.best else None,
                                   "techniques": rec.techniques, "notes": rec.notes,
                                   "accuracy_sources": rec.accuracy_sources}
    else:
        result = plan(settings, ns.methods or DEFAULT_METHODS)
        if settings.budget_bytes is not None:
            from .memory.recommend import mark_fastest

            mark_fastest(result.methods)
        print(format_plan(result))
        times = format_step_times(result)
        if times:
            print("\n" + times)
    if ns.num_gpus > 1 or ns.sharding:
        extra["distributed"] = _distributed(result, ns, settings)
    if ns.json:
        path = Path(ns.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result.to_dict(), **extra}, indent=2) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


DEFAULT_METHODS = "full,lora,adapter,bitfit,lst"


def _distributed(result, ns, settings) -> dict:
    from .memory.sharding import shard_plan
    from .memory.step_time import profile_for
    from .plan_report import format_sharding

    scheme = ns.sharding or "ddp"
    profile = profile_for(settings)
    shards = {m.label: shard_plan(m, ns.num_gpus, scheme, profile, num_blocks=result.num_layers,
                                  budget_bytes=settings.budget_bytes, batch_size=settings.batch_size)
              for m in result.methods if m.status == "ok"}
    print(format_sharding(shards))
    return {"num_gpus": ns.num_gpus, "sharding": scheme, "batch_size_per_gpu": settings.batch_size,
            "per_method": {k: v.to_dict() for k, v in shards.items()}}

"""`memtune plan`: will this fit on my GPU? Every method's training-step memory, planned without weights.

    memtune plan --model t5-base --methods full,lora,lst --batch-size 100 --max-length 128 --budget 24GiB
    memtune plan --model clip-rn101-grid+t5-base-vl --methods full,lora,lst:r=4 --batch-size 300 --max-length 20 \
        --objective seq2seq --target-length 4           # LST's CLIP-T5: pre-extracted features beside T5-base

Prints one row per method (GiB = 2^30 bytes): trainable parameters, weights, gradients, optimizer
state, activation peak (peak − memory at the step's start), total peak, whether it fits the budget and
the largest batch that does. `--json PATH` writes every figure in bytes. The workload flags are
generated from `PlanSettings` (see `cli.fields`).
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

from .fields import add_field_flags, field_help, given

GIB = 2 ** 30
_UNITS = {"": GIB, "b": 1, "k": 2 ** 10, "kib": 2 ** 10, "kb": 10 ** 3, "m": 2 ** 20, "mib": 2 ** 20, "mb": 10 ** 6,
          "g": GIB, "gib": GIB, "gb": 10 ** 9, "t": 2 ** 40, "tib": 2 ** 40, "tb": 10 ** 12}
DEFAULT_METHODS = "full,lora,adapter,bitfit,lst"


def _plan_settings():
    from ..memory.plan_types import PlanSettings

    return PlanSettings


def parse_budget(text: str) -> int:
    """'16GiB', '24 GiB', '80' (GiB), '16000MiB', '40GB' (10^9 bytes) → bytes."""
    from ..methods import ConfigError

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ConfigError(f"--budget: cannot read {text!r}; write e.g. 16GiB, 24GiB, 80 (GiB), 16000MiB or 40GB "
                          "(GB = 10^9 bytes)")
    value = float(m.group(1)) * _UNITS[unit]
    if value <= 0:
        raise ConfigError(f"--budget must be > 0, got {text!r}")
    return int(value)


def add_parser(sub) -> None:
    from ..memory.devices import PROFILE_NAMES
    from ..memory.sharding import SCHEMES

    settings = _plan_settings()
    p = sub.add_parser("plan", help="estimate each method's training-step memory without weights (meta device)",
                       description=__doc__.split("\n\n")[0])
    add_field_flags(p, settings, ["model"])
    p.add_argument("--methods", default=None,
                   help=f"comma list of methods (default {DEFAULT_METHODS}; with --budget and no "
                        "--methods, every method × memory technique is searched and the fastest that fits "
                        "is recommended); name:key=value adds options (e.g. lst:r=16)")
    workload = [f.name for f in dataclasses.fields(settings) if f.name != "model"]
    add_field_flags(p, settings, workload, budget_bytes={
        "flag": "--budget", "metavar": "BUDGET", "type": str,
        "help": "GPU memory to fit, e.g. 16GiB, 24GiB, 80GiB"}, device_profile={
        "metavar": "NAME", "help": f"{field_help(settings, 'device_profile')}; known: {', '.join(PROFILE_NAMES)}"})
    p.add_argument("--json", default=None, help="write the plan here (bytes and GiB)")
    p.add_argument("--num-gpus", type=int, default=1, help="data-parallel GPUs (--batch-size is per GPU)")
    p.add_argument("--sharding", choices=SCHEMES, default=None,
                   help="how N GPUs split the model state (default ddp with --num-gpus > 1)")
    p.set_defaults(handler=run)


def settings_from_args(ns):
    """The PlanSettings the flags give; `--budget` read by `parse_budget`."""
    values = given(ns, [f.name for f in dataclasses.fields(_plan_settings())])
    if "budget_bytes" in values:
        values["budget_bytes"] = parse_budget(values["budget_bytes"])
    return _plan_settings()(**values)


def run(ns) -> int:
    from ..memory.plan import plan
    from ..plan_report import format_plan, format_step_times

    settings = settings_from_args(ns)
    if ns.num_gpus < 1:
        from ..methods import ConfigError

        raise ConfigError(f"--num-gpus must be >= 1, got {ns.num_gpus}")
    search = settings.budget_bytes is not None and ns.methods is None and ns.num_gpus == 1
    extra = {}
    if search:                   # "what is fastest that fits?": every method × technique, the fastest marked
        from ..memory.recommend import recommend
        from ..plan_report import format_recommendation

        rec = recommend(settings, precision_fixed=ns.precision is not None)
        result = rec.result
        print(format_recommendation(rec).lstrip("\n"))
        extra["recommendation"] = {"recommended": rec.best.label if rec.best else None,
                                   "techniques": rec.techniques, "notes": rec.notes,
                                   "accuracy_sources": rec.accuracy_sources}
    else:
        result = plan(settings, ns.methods or DEFAULT_METHODS)
        if settings.budget_bytes is not None:
            from ..memory.recommend import mark_fastest

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


def _distributed(result, ns, settings) -> dict:
    from ..memory.sharding import shard_plan
    from ..memory.step_time import profile_for
    from ..plan_report import format_sharding

    scheme = ns.sharding or "ddp"
    profile = profile_for(settings)
    shards = {m.label: shard_plan(m, ns.num_gpus, scheme, profile, num_blocks=result.num_layers,
                                  budget_bytes=settings.budget_bytes, batch_size=settings.batch_size)
              for m in result.methods if m.status == "ok"}
    print(format_sharding(shards))
    return {"num_gpus": ns.num_gpus, "sharding": scheme, "batch_size_per_gpu": settings.batch_size,
            "per_method": {k: v.to_dict() for k, v in shards.items()}}

"""`memtune compare`: train each method in a fresh process and tabulate memory, time and accuracy."""
from __future__ import annotations

from .fields import as_flags, given
from .run_flags import TECHNIQUES, add_run_flags, run_settings

PRESETS = {
    # The README's main job (`make demo`): a representative subset of methods on MiniLM + Rotten Tomatoes, next
    # to what users run when memory is short (LoRA + checkpointing), in under 10 minutes on 2 CPU cores.
    # `make bench` (benchmarks/run_cpu.py) runs every method on 3,000 / 1,000 examples for the README's table.
    "demo": {"batch_size": 16, "max_length": 64, "train_limit": 1000, "test_limit": 500, "epochs": 1.0,
             "memory_batch_size": 32, "memory_max_length": 128},
}
# Rows a preset compares when --methods is not given.
PRESET_METHODS = {"demo": "full,lora,lora+gc,lst,sherl,meft2,qst"}


def add_parser(sub) -> None:
    c = sub.add_parser("compare", help="train each method in a fresh process and tabulate memory, time, accuracy")
    add_run_flags(c)
    c.add_argument("--methods", default=None, help="comma list; name:key=value adds options, +gc / +nf4 / +fp4 / "
                   "+int8 / +offload add memory techniques (default: every method, lora+gc and full+gc)")
    c.add_argument("--preset", choices=sorted(PRESETS), default=None)
    c.add_argument("--out", default="runs/compare")
    c.add_argument("--json", default=None, help="also write the records here")
    c.add_argument("--seeds", default=None,
                   help="a count (3: seeds from --seed on) or a comma list; the table shows mean ± 95 %% interval")
    c.add_argument("--lr-grid", default=None,
                   help="comma list of learning rates: each row picks its best on a validation split "
                        "(--val-fraction, default 0.1) with the first seed, then runs every seed at the pick")
    c.set_defaults(handler=run)


def run(ns) -> int:
    from ..compare import run_compare
    from ..methods import METHODS
    from ..preflight import check_compare
    from ..spec import split_specs, with_techniques
    from ..sweep import parse_lr_grid, parse_seeds
    from ..train import ArgumentError, TrainArgs

    # Default: every method once ("meft" is the generic form of meft1/2/3 and would repeat meft1), and
    # what users run when memory is short: LoRA and full fine-tuning with gradient checkpointing.
    methods = ns.methods or PRESET_METHODS.get(ns.preset)
    specs = split_specs(methods) if methods else [m for m in METHODS if m != "meft"] + ["lora+gc", "full+gc"]
    shared = TrainArgs(ns.model, ns.task, **given(ns, ["progress", *TECHNIQUES]))      # what every row shares
    specs = with_techniques(specs, shared.techniques().names())     # --quantize nf4 etc. apply to every row
    settings = run_settings(ns, PRESETS.get(ns.preset))
    check_compare(specs, settings, ns.model, ns.task)    # shared bad input fails before any method runs
    flags = ["--model", ns.model, "--task", ns.task, *as_flags(TrainArgs, settings)]
    seeds = parse_seeds(ns.seeds, settings.get("seed", 0)) if ns.seeds else None
    lr_grid = parse_lr_grid(ns.lr_grid)
    if lr_grid and "lr" in settings:
        raise ArgumentError("give either --lr or --lr-grid, not both")
    run_compare(specs, flags, ns.out, ns.json, progress=shared.progress, seeds=seeds, lr_grid=lr_grid,
                val_fraction=settings.get("val_fraction") or 0.1)
    return 0

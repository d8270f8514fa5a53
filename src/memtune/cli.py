"""`memtune train | eval | compare | plan`: the command line.

Bad input (unknown model/task/method, a bad option value, malformed data, a checkpoint for another
model) prints one line `memtune: error: ...` and exits with code 2, before anything is written.
A full disk also exits with code 2 (one line naming the folder and the bytes needed); a run that fails
while training (NaN loss) exits with code 1. Both keep the last checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing

PRESETS = {
    # The README's main job (`make demo`): a representative subset of methods on MiniLM + Rotten Tomatoes, next
    # to what users run when memory is short (LoRA + checkpointing), in under 10 minutes on 2 CPU cores.
    # `make bench` (benchmarks/run_cpu.py) runs every method on 3,000 / 1,000 examples for the README's table.
    "demo": {"batch_size": 16, "max_length": 64, "train_limit": 1000, "test_limit": 500, "epochs": 1.0,
             "memory_batch_size": 32, "memory_max_length": 128},
}
# Rows a preset compares when --methods is not given.
PRESET_METHODS = {"demo": "full,lora,lora+gc,lst,sherl,meft2,qst"}


def _user_errors():
    from .assets import AssetMissing
    from .atomic import DiskFullError
    from .backbones import UnsupportedModel
    from .checkpoint import CheckpointError
    from .data import TaskError
    from .methods import ConfigError
    from .models import ModelError
    from .train import ArgumentError

    # A full disk is the user's to fix (free space, then --resume): exit 2 like bad input, nothing lost.
    return (ConfigError, TaskError, ModelError, ArgumentError, CheckpointError, UnsupportedModel, AssetMissing,
            DiskFullError)


def _runtime_errors():
    from .train import TrainingError

    return (TrainingError,)


def method_option_fields() -> dict[str, set[str]]:
    """Every method option name → the methods that have it (each becomes a `--name` flag)."""
    from .methods import METHODS

    fields: dict[str, set[str]] = {}
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls):
            fields.setdefault(f.name, set()).add(name)
    return fields


def add_run_flags(p: argparse.ArgumentParser, with_method=True) -> None:
    p.add_argument("--model", required=True, help="bundled alias (minilm, dinov2-s, tiny-bert, ...), folder or hub id")
    p.add_argument("--task", required=True, help="rotten-tomatoes, fashion-mnist, digits, mnist-5k, drug-reviews, "
                                                  "csv:PATH, jsonl:PATH or an image folder")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None, help="default: the method's own")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--max-length", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--objective", choices=["classification", "causal-lm"], default=None)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--text-column", default=None)
    p.add_argument("--label-column", default=None)
    p.add_argument("--val-fraction", type=float, default=None,
                   help="hold out this share of the training data as a validation split (reported as val_*)")
    p.add_argument("--memory-batch-size", type=int, default=None, help="batch of the memory run (default: --batch-size)")
    p.add_argument("--memory-max-length", type=int, default=None,
                   help="padded length of the memory run (default: --max-length)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    tech = p.add_argument_group("memory techniques (any method where they make sense; compare: every row)")
    tech.add_argument("--gradient-checkpointing", action="store_true",
                      help="recompute the backbone blocks that the backward pass crosses (+gc)")
    tech.add_argument("--quantize", choices=["nf4", "fp4", "int8"], default=None,
                      help="frozen base weights in 4 or 8 bits through bitsandbytes (+nf4, +fp4, +int8)")
    tech.add_argument("--offload-activations", action="store_true",
                      help="keep saved activations in pinned CPU memory during the step (CUDA only; +offload)")


RUN_FLAGS = ("epochs", "max_steps", "batch_size", "eval_batch_size", "lr", "weight_decay", "max_length",
             "image_size", "seed", "precision", "objective", "train_limit", "test_limit", "text_column",
             "label_column", "memory_batch_size", "memory_max_length", "val_fraction")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memtune", description="Memory-efficient fine-tuning, measured.")
    sub = parser.add_subparsers(dest="command", required=True)

    from .cli_help import methods_listing, option_help
    from .methods import METHODS

    t = sub.add_parser("train", help="fine-tune one method and evaluate it", description=methods_listing(METHODS),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(t)
    t.add_argument("--method", default="lora")
    t.add_argument("--out", default="runs/train")
    t.add_argument("--checkpoint-every", type=int, default=None, help="write an atomic checkpoint every N steps")
    t.add_argument("--resume", default=None, help="continue from a run folder or checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its checkpoints, adapter and metrics are removed)")
    t.add_argument("--measure-memory", action="store_true", help="measure one step's peak memory first")
    t.add_argument("--eval-before", action="store_true", help="also evaluate the model before training")
    t.add_argument("--num-processes", type=int, default=1, help="data-parallel processes (DDP via torch.distributed)")
    opts = t.add_argument_group("method options (each applies to the methods that have it)")
    for name, methods in sorted(method_option_fields().items()):
        opts.add_argument(f"--{name.replace('_', '-')}", dest=f"opt__{name}", default=None, metavar="V",
                          help=option_help(name, sorted(methods), METHODS))

    e = sub.add_parser("eval", help="evaluate a saved adapter")
    e.add_argument("--model", required=True)
    e.add_argument("--task", default=None, help="default: the task the adapter was trained on")
    e.add_argument("--adapter", required=True, help="folder with adapter_config.json + adapter_model.safetensors")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--no-progress", action="store_true")

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

    from .merge import add_merge_parser
    from .plan_cli import add_plan_parser
    from .predict import add_predict_parser
    add_plan_parser(sub)
    add_predict_parser(sub)
    add_merge_parser(sub)
    return parser


def _run_settings(ns, preset=None) -> dict:
    settings = dict(PRESETS.get(preset, {})) if preset else {}
    for k in RUN_FLAGS:
        v = getattr(ns, k, None)
        if v is not None:
            settings[k] = v
    return settings


def cmd_train(ns) -> int:
    from .run_folder import check_run_folder
    from .train import ArgumentError, TrainArgs, train

    if ns.num_processes < 1:
        raise ArgumentError(f"--num-processes must be a whole number >= 1 (1: one process, N: N data-parallel "
                            f"processes), got {ns.num_processes}")
    if ns.num_processes > 1:
        check_run_folder(ns.out, ns.resume, ns.overwrite)      # before N processes start
        return _launch_distributed(ns.num_processes)
    fields = method_option_fields()
    options = {name: getattr(ns, f"opt__{name}") for name in fields if getattr(ns, f"opt__{name}") is not None}
    from .methods import METHODS, ConfigError

    if ns.method not in METHODS:
        raise ConfigError(f"unknown method {ns.method!r}; available: {', '.join(METHODS)}")
    wrong = [k for k in options if ns.method not in fields[k]]
    if wrong:
        own = [f.name for f in dataclasses.fields(METHODS[ns.method])]
        raise ConfigError(f"option(s) {', '.join('--' + w.replace('_', '-') for w in wrong)} do not apply to "
                          f"method {ns.method!r}; its options: "
                          f"{', '.join('--' + o.replace('_', '-') for o in own) or 'none'}")
    args = TrainArgs(model=ns.model, task=ns.task, method=ns.method, options=options, out=ns.out,
                     checkpoint_every=ns.checkpoint_every, resume=ns.resume, measure_memory=ns.measure_memory,
                     eval_before=ns.eval_before, overwrite=ns.overwrite,
                     gradient_checkpointing=ns.gradient_checkpointing, quantize=ns.quantize,
                     offload_activations=ns.offload_activations,
                     progress=not ns.no_progress, **_run_settings(ns))
    m = train(args)
    if os.environ.get("RANK", "0") != "0":          # data-parallel run: the main process reports
        return 0
    print("\n".join(train_report(m, ns.out if not m.get("already_finished") else ns.resume)))
    return 0


def _score(m: dict) -> str:
    return f"accuracy {m['accuracy']:.4f}" if "accuracy" in m else f"perplexity {m['perplexity']:.2f}"


def train_report(m: dict, folder) -> list[str]:
    """The lines `memtune train` prints: memory and the untrained score when asked for, then the summary."""
    lines = []
    if m.get("already_finished"):
        lines.append(f"memtune: the run in {folder} is already finished ({m['steps']} steps); nothing to train, "
                     "metrics.json is unchanged. Its metrics:")
    if "peak_bytes" in m:
        s = m.get("settings", {})
        shape = f"batch {s.get('memory_batch_size') or s.get('batch_size')} × " \
                f"{s.get('memory_max_length') or s.get('max_length')}"
        lines.append(f"memory: peak {m['peak_bytes'] / 2**30:.3g} GiB, activations "
                     f"{m['activation_peak_bytes'] / 2**30:.3g} GiB (one training step, {shape})")
    if "before" in m:
        lines.append(f"before training: {_score(m['before'])}")
    step = f"{m['step_time_s']:.3f} s/step" if m.get("step_time_s") is not None else "no step timed in this run"
    lines.append(f"{m['method']}: {_score(m)}; trainable {m['trainable_params']:,} ({m['trainable_pct']:.2f} %); "
                 f"{step}; {m['wall_time_s']:.0f} s in all; saved to {folder}")
    return lines


def _launch_distributed(n: int) -> int:
    """Re-run this command under torch.distributed with N processes (gloo on CPU, nccl on GPUs)."""
    import subprocess

    argv = sys.argv[1:]
    i = argv.index("--num-processes")
    argv = argv[:i] + argv[i + 2:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "memtune",
           *argv]
    return subprocess.call(cmd)


def cmd_eval(ns) -> int:
    import json
    from pathlib import Path

    import torch

    from .api import load
    from .checkpoint import read_adapter_config
    from .data import load_task, make_collate
    from .models import load_model
    from .preflight import align_task_labels, check_batch_size, check_task_fits_model
    from .train import evaluate

    check_batch_size(ns.batch_size)
    saved = read_adapter_config(ns.adapter)
    metrics_file = Path(ns.adapter) / "metrics.json"
    try:
        settings = json.loads(metrics_file.read_text(encoding="utf-8")).get("settings", {}) \
            if metrics_file.exists() else {}
    except (ValueError, AttributeError) as e:
        from .checkpoint import CheckpointError
        raise CheckpointError(f"{metrics_file}: unreadable ({e}); expected the JSON file that memtune train "
                              "writes") from None
    task_name = ns.task or settings.get("task")
    if task_name is None:
        from .data import TaskError
        raise TaskError("--task is required: the adapter folder has no metrics.json naming its task")
    loaded = load_model(ns.model)
    model = load(loaded, ns.adapter)
    task = load_task(task_name, seed=settings.get("seed", 0), test_limit=settings.get("test_limit"),
                     text_column=settings.get("text_column", "text"), label_column=settings.get("label_column", "label"))
    check_task_fits_model(task, task_name, loaded, model)
    note = align_task_labels(task, task_name, model)
    if note:
        print(f"memtune: {note}", file=sys.stderr)
    collate = make_collate(task.kind, loaded.preprocessor, max_length=settings.get("max_length", 128),
                           image_size=settings.get("image_size"), causal_lm=saved.get("objective") == "causal-lm")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate(model.to(device), task.test, collate, ns.batch_size, device, progress=not ns.no_progress)
    print(json.dumps({"method": saved["method"], "task": task_name, **result}))
    return 0


def _technique_flags(ns) -> list[str]:
    return [n for n, on in ((ns.quantize, ns.quantize), ("gc", ns.gradient_checkpointing),
                            ("offload", ns.offload_activations)) if on]


def cmd_compare(ns) -> int:
    from .compare import run_compare
    from .methods import METHODS
    from .preflight import check_compare

    from .spec import split_specs, with_techniques

    # Default: every method once ("meft" is the generic form of meft1/2/3 and would repeat meft1), and
    # what users run when memory is short: LoRA and full fine-tuning with gradient checkpointing.
    methods = ns.methods or PRESET_METHODS.get(ns.preset)
    specs = split_specs(methods) if methods else [m for m in METHODS if m != "meft"] + ["lora+gc", "full+gc"]
    specs = with_techniques(specs, _technique_flags(ns))     # --quantize nf4 etc. apply to every row
    settings = _run_settings(ns, ns.preset)
    check_compare(specs, settings, ns.model, ns.task)    # shared bad input fails before any method runs
    flags = ["--model", ns.model, "--task", ns.task]
    for k, v in settings.items():
        flags += [f"--{k.replace('_', '-')}", str(v)]
    from .sweep import parse_lr_grid, parse_seeds

    seeds = parse_seeds(ns.seeds, settings.get("seed", 0)) if ns.seeds else None
    lr_grid = parse_lr_grid(ns.lr_grid)
    if lr_grid and "lr" in settings:
        from .train import ArgumentError
        raise ArgumentError("give either --lr or --lr-grid, not both")
    run_compare(specs, flags, ns.out, ns.json, progress=not ns.no_progress, seeds=seeds, lr_grid=lr_grid,
                val_fraction=settings.get("val_fraction") or 0.1)
    return 0


def main(argv=None) -> int:
    import logging

    # bitsandbytes warns on import when an optional CPU kernel package is missing: noise before the one line
    # that bad input gets (its errors still show).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = build_parser()
    ns = parser.parse_args(argv)
    handlers = {"train": cmd_train, "eval": cmd_eval, "compare": cmd_compare}
    from .merge import cmd_merge
    from .plan_cli import cmd_plan
    from .predict import cmd_predict
    handlers.update(plan=cmd_plan, predict=cmd_predict, merge=cmd_merge)
    try:
        return handlers[ns.command](ns)
    except _user_errors() as e:
        print(f"memtune: error: {e}", file=sys.stderr)
        return 2
    except _runtime_errors() as e:
        print(f"memtune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("memtune: interrupted", file=sys.stderr)
        return 130

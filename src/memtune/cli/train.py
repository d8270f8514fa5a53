"""`memtune train`: fine-tune one method and evaluate it (one process, or N data-parallel ones)."""
from __future__ import annotations

import argparse
import os
import sys

from .fields import add_field_flags, given
from .method_flags import add_method_option_flags, method_options, methods_listing
from .run_flags import TECHNIQUES, TRAIN_ONLY, add_run_flags, shared_fields


def add_parser(sub) -> None:
    from ..methods import METHODS
    from ..train import TrainArgs

    p = sub.add_parser("train", help="fine-tune one method and evaluate it", description=methods_listing(METHODS),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(p)
    add_field_flags(p, TrainArgs, TRAIN_ONLY, out={"default": "runs/train"})
    p.add_argument("--num-processes", type=int, default=1, help="data-parallel processes (DDP via torch.distributed)")
    add_method_option_flags(p)
    p.set_defaults(handler=run)


def run(ns) -> int:
    from ..run_folder import check_run_folder
    from ..train import ArgumentError, TrainArgs, train

    args = TrainArgs(**given(ns, [*shared_fields(), *TECHNIQUES, *TRAIN_ONLY]))
    if ns.num_processes < 1:
        raise ArgumentError(f"--num-processes must be a whole number >= 1 (1: one process, N: N data-parallel "
                            f"processes), got {ns.num_processes}")
    if ns.num_processes > 1:
        check_run_folder(args.out, args.resume, args.overwrite)      # before N processes start
        return _launch_distributed(ns.num_processes)
    args.options = method_options(ns, args.method)
    m = train(args)
    if os.environ.get("RANK", "0") != "0":          # data-parallel run: the main process reports
        return 0
    print("\n".join(train_report(m, args.out if not m.get("already_finished") else args.resume)))
    return 0


def _score(m: dict, metrics=None) -> str:
    """The task's metrics, main first ("accuracy 0.8125", "f1 0.8000, accuracy 0.7500"), or the perplexity."""
    metrics = metrics or m.get("task_metrics") or ["accuracy"]
    if "perplexity" in m:
        return f"perplexity {m['perplexity']:.2f}"
    return ", ".join(f"{name} {m[name]:.4f}" for name in metrics if m.get(name) is not None)


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
        lines.append(f"before training: {_score(m['before'], m.get('task_metrics'))}")
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

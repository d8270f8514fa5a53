"""`memtune plan`'s time, recommendation and distributed sections (text and JSON).

    memtune plan --model llama-7b --budget 24GiB --max-length 2048            # search, mark the fastest
    memtune plan --model llama-3.1-70b --num-gpus 8 --sharding fsdp --budget 80GiB --methods lora
"""
from __future__ import annotations

GIB = 2 ** 30


def _gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def _secs(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.2f} s"


def _table(head, rows) -> list[str]:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(head), *(fmt(r) for r in rows)]


def format_step_times(result) -> str:
    """Predicted step time per planned row at the planned batch, and its ratio to full fine-tuning."""
    ok = [m for m in result.methods if m.status == "ok" and m.step_time_s is not None]
    if not ok:
        return ""
    profile = ok[0].device_profile
    rows = [[m.label, _secs(m.step_time_s), "-" if m.time_vs_full is None else f"{m.time_vs_full:.2f}",
             f"{m.step_flops / 1e12:.3f}"] for m in ok]
    lines = [f"Predicted step time on {profile} at batch {result.settings.batch_size} (counted FLOPs and bytes; "
             "--device-profile to change):", *_table(["method", "step", "× full", "TFLOP"], rows)]
    if all(m.time_vs_full is None for m in ok):
        lines.append("(add full to --methods for the ratio to full fine-tuning)")
    return "\n".join(lines)


def format_recommendation(rec) -> str:
    s = rec.result.settings
    rows, skipped = [], {}
    for m in rec.result.methods:
        if m.status != "ok":
            skipped.setdefault(m.message, []).append(m.label)
            continue
        fits = bool(m.max_batch_size)
        acc = "-"
        if m.benchmark_accuracy:
            acc = ", ".join(f"{v:.3f}" for v in m.benchmark_accuracy.values())
        rows.append([("* " if m.recommended else "  ") + m.label, str(m.max_batch_size or 0),
                     _gib(m.max_batch_peak_bytes if fits else m.peak_bytes),
                     _secs(m.max_batch_step_time_s) if fits else "-",
                     _secs(m.time_per_example_s) if fits else "-",
                     "-" if m.time_vs_full is None else f"{m.time_vs_full:.2f}", acc,
                     "yes" if fits else "no"])
    lines = ["", f"Recommendation: fastest per example that fits {s.budget_bytes / GIB:.2f} GiB "
                 f"(length {s.max_length}; techniques searched: {', '.join(rec.techniques) or 'none'}; peak at the "
                 f"largest batch that fits, else at batch {s.batch_size}; × full: step time at batch {s.batch_size} "
                 "over full fine-tuning's at the same precision):"]
    lines += _table(["  configuration", "max batch", "peak GiB", "step", "per example", "× full",
                     "bench acc", "fits"], rows)
    for message, labels in skipped.items():
        lines.append(f"not planned: {', '.join(labels)}: {message}")
    if rec.best is not None:
        b = rec.best
        lines.append(f"Recommended: {b.label} at batch {b.max_batch_size} ({_gib(b.max_batch_peak_bytes)} GiB peak, "
                     f"{_secs(b.max_batch_step_time_s)} per step, {_secs(b.time_per_example_s)} per example on "
                     f"{b.device_profile}).")
    else:
        lines.append("Nothing fits: not even one example of any searched configuration.")
    if rec.accuracy_sources:
        lines.append("bench acc: accuracy the committed benchmark measured for the method ("
                     + "; ".join(rec.accuracy_sources) + "), not a prediction for this model and task.")
    lines += rec.notes
    return "\n".join(lines)


def format_sharding(shards: dict) -> str:
    """`shards`: row label → ShardedPlan."""
    if not shards:
        return ""
    first = next(iter(shards.values()))
    head = ["method", "params", "grads", "optim", "gathered", "peak/GPU", "comm/step", "comm s", "step s",
            "max batch/GPU"]
    rows = [[label, _gib(sp.static_per_gpu["parameter"]), _gib(sp.static_per_gpu["gradient"]),
             _gib(sp.static_per_gpu["optimizer"]), _gib(sp.gathered_bytes + sp.bucket_bytes), _gib(sp.peak_bytes),
             _gib(sp.comm_bytes), _secs(sp.comm_seconds), _secs(sp.step_time_s),
             "-" if sp.max_batch_size is None else str(sp.max_batch_size)] for label, sp in shards.items()]
    lines = ["", f"Per GPU on {first.num_gpus} GPUs, {first.scheme} (shard group {first.shard_group}; GiB; "
                 "batch per GPU; comm = bytes each GPU sends per step):", *_table(head, rows)]
    for label, sp in shards.items():
        lines += [f"{label}: {n}" for n in sp.notes]
    return "\n".join(lines)

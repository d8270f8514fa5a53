"""`memtune plan`'s text: the memory table with its budget summary, and the time, recommendation and distributed
sections.

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


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _workload_shape(result) -> str:
    """Image families: the image size and the tokens it makes; text: the padded length; image-text compositions:
    the text length and how the visual tokens are made."""
    s = result.settings
    if result.modality == "image_text":
        return f"length {s.max_length} + {result.visual_tokens} visual tokens ({result.visual_source})"
    if result.modality == "image":
        return f"image {s.image_size or '(default)'} px → {result.tokens} tokens"
    return f"length {s.max_length}"


def _pct_note(result) -> str | None:
    """What the % column divides by, where it is not the pretrained model's weights."""
    if not any(m.pct_of == "all" for m in result.methods if m.status == "ok"):
        return None
    note = ("% = trainable / all parameters of the wrapped model (trainable ones included), as the official VL code "
            "prints its \"% updated\"")
    if any(m.paper_pct is not None for m in result.methods):
        note += "; paper % = the paper's figure for that row (its source in the notes)"
    return note + "."


def format_plan(result) -> str:
    """The human-readable memory table (GiB) with a header naming the workload."""
    s = result.settings
    lines = [
        f"memtune plan: {s.model} ({result.model_source}, {result.model_type}, {result.num_layers} layers), "
        f"batch {s.batch_size}, {_workload_shape(result)}, {s.precision}, {s.optimizer}, attention {s.attn}"
        + (", gradient checkpointing" if s.gradient_checkpointing else "")
        + (f", budget {s.budget_bytes / GIB:.2f} GiB" if s.budget_bytes else ""),
        "GiB = 2^30 bytes; peak = what torch.cuda.max_memory_allocated() reports for one training step; "
        "reserved memory runs 1-30 % higher and the CUDA context adds about 0.5 GiB: keep that headroom.",
        *([_pct_note(result)] if _pct_note(result) else []),
        "",
    ]
    paper = any(m.paper_pct is not None for m in result.methods)
    head = ["method", "trainable", "%", *(["paper %"] if paper else []), "params", "grads", "optim", "act peak",
            "peak"]
    if s.budget_bytes:
        head += ["fits", "max batch"]
    rows = []
    for m in result.methods:
        if m.status != "ok":
            rows.append([m.label, f"{m.status}: {m.message}"])
            continue
        row = [m.label, _count(m.trainable_params), f"{m.trainable_pct:.2f}",
               *([("-" if m.paper_pct is None else f"{m.paper_pct:.2f}")] if paper else []), _gib(m.parameter_bytes),
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

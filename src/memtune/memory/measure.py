"""Measure a training step's memory like the papers do (docs/methods/anchors.md §4.2).

    report = measure_training_memory(model, batch, optimizer, warmup=2, steps=1)

CUDA: allocator statistics (`max_memory_allocated`, `max_memory_reserved`) over `steps` measured steps
after `warmup` full steps (AdamW's state exists only after the first), peak stats reset in between.
CPU (and anything else): the exact live-bytes tracker, split by category.
activation_peak = peak − bytes allocated at the start of the step (the MEFT paper's definition).
host_cache_bytes: a method's trunk cache (`model.cache_bytes`), held in host memory or a file and not part
of the peak; None for methods without one. The warmup steps fill it, so the measured step replays it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .tracker import LiveBytesTracker


@dataclass
class MemoryReport:
    device: str
    peak_bytes: int
    start_bytes: int
    activation_peak_bytes: int
    reserved_bytes: int | None = None
    split: dict[str, int] = field(default_factory=dict)        # at the peak (CPU tracker)
    static: dict[str, int] = field(default_factory=dict)       # numel × element size
    saved_activation_bytes: int | None = None                  # max bytes held for backward (CPU)
    host_cache_bytes: int | None = None                        # a method's trunk cache in host memory/file

    def to_dict(self):
        return asdict(self)


def static_bytes(model, optimizer) -> dict[str, int]:
    """Parameters, gradients (trainable parameters' size) and optimizer state, from numel × element size."""
    params = {id(p): p for p in model.parameters()}.values()
    state = 0
    for s in optimizer.state.values():
        state += sum(t.numel() * t.element_size() for t in s.values() if isinstance(t, torch.Tensor))
    return {
        "parameters": sum(p.numel() * p.element_size() for p in params),
        "gradients": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        "optimizer": state,
    }


def training_step(model, batch, optimizer, autocast=None) -> torch.Tensor:
    """forward, backward, optimizer step, zero_grad(set_to_none=True): the unit every paper measures."""
    if autocast is not None:
        with autocast:
            loss = model(**batch).loss
    else:
        loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def measure_training_memory(model, batch, optimizer, *, warmup: int = 2, steps: int = 1,
                            autocast=None) -> MemoryReport:
    device = next(model.parameters()).device
    for _ in range(warmup):
        training_step(model, batch, optimizer, autocast)
    if device.type == "cuda":
        return _measure_cuda(model, batch, optimizer, steps, autocast, device)
    return _measure_tracked(model, batch, optimizer, steps, autocast, device)


def _measure_cuda(model, batch, optimizer, steps, autocast, device) -> MemoryReport:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    for _ in range(max(1, steps)):
        training_step(model, batch, optimizer, autocast)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return MemoryReport("cuda", peak, start, peak - start, torch.cuda.max_memory_reserved(device),
                        static=static_bytes(model, optimizer), host_cache_bytes=getattr(model, "cache_bytes", None))


def _measure_tracked(model, batch, optimizer, steps, autocast, device) -> MemoryReport:
    best = None
    for _ in range(max(1, steps)):
        tracker = LiveBytesTracker(model, optimizer, inputs=batch)
        with tracker:
            training_step(model, batch, optimizer, autocast)
        r = tracker.result()
        if best is None or r.peak_bytes > best.peak_bytes:
            best = r
    return MemoryReport(device.type, best.peak_bytes, best.start_bytes, best.peak_bytes - best.start_bytes,
                        split=best.peak_split, static=static_bytes(model, optimizer),
                        saved_activation_bytes=best.max_activation_bytes,
                        host_cache_bytes=getattr(model, "cache_bytes", None))

"""A planned workload's training step on real tensors on this CPU, to time it (calibration and benchmarks).

    step = build_real_step(PlanSettings(model="minilm", batch_size=8, max_length=64, device="cpu"), "lora", {})
    seconds = time_step(step, warmup=2, steps=5)

The step is the planner's: the same model (bundled weights, or random weights for a tiny alias), the method's
wrapper, the planner's optimizer (`make_optimizer`), a batch shaped as `make_batch` (every token real), and
forward, backward, `optimizer.step()`, `zero_grad(set_to_none=True)`.
"""
from __future__ import annotations

import time

import torch


class RealStep:
    def __init__(self, model, optimizer, batch, gradient_checkpointing: bool):
        self.model, self.optimizer, self.batch = model, optimizer, batch
        self.gradient_checkpointing = gradient_checkpointing

    def __call__(self) -> None:
        from .measure import training_step

        training_step(self.model, self.batch, self.optimizer)


def real_batch(meta_batch: dict[str, torch.Tensor], device="cpu") -> dict[str, torch.Tensor]:
    """The plan's batch (`plan_step.make_batch`) with values on `device`: token ids 5, every token real,
    labels 0 (token targets, causal LM or seq2seq: ids 5 as the inputs), seeded normal pixels."""
    out = {}
    for k, v in meta_batch.items():
        if v.dtype == torch.long:
            fill = {"attention_mask": 1, "token_type_ids": 0, "labels": 0}.get(k, 5)
            out[k] = torch.full(v.shape, fill, dtype=torch.long, device=device)
        else:
            pixels = torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
            out[k] = pixels.to(device=device, dtype=v.dtype)
    if out["labels"].dim() == 2:        # token targets, as the ids: the inputs (causal LM), B×Tt (seq2seq)
        out["labels"] = torch.full_like(out["labels"], 5)
    return out


def build_real_step(settings, method: str, options: dict) -> RealStep:
    """The plan's step for `method` on real tensors (CPU); settings.model must be loadable here."""
    from memtune.models import load_model
    from memtune.techniques.checkpointing import BlockCheckpointing

    from .plan_step import make_batch, make_optimizer, wrap_planned

    torch.manual_seed(0)
    loaded = load_model(settings.model, attn_implementation=settings.attn)
    model = wrap_planned(loaded, loaded.model.config, settings, method, options)
    if settings.gradient_checkpointing:
        BlockCheckpointing(model.backbone)
    optimizer = make_optimizer(model, settings)
    return RealStep(model, optimizer, real_batch(make_batch(model, settings, settings.batch_size)),
                    settings.gradient_checkpointing)


def step_clock():
    """The clock to time this process's work with: CPU time with one torch thread (time other processes
    take from the core does not count), wall time with more (CPU time would add the threads up)."""
    return time.process_time if torch.get_num_threads() == 1 else time.perf_counter


def step_times(step, warmup: int = 2, steps: int = 5) -> list[float]:
    """Seconds of `steps` timed calls after `warmup` untimed ones, on `step_clock()` (CPU time of
    this process with one torch thread: other processes' load on a shared machine does not count)."""
    clock = step_clock()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = clock()
        step()
        times.append(clock() - t0)
    return times


def time_step(step, warmup: int = 2, steps: int = 5) -> float:
    """The fastest of `step_times` (a shared machine only ever adds to a step)."""
    return min(step_times(step, warmup, steps))

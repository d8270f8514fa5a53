"""Empirical diagonal Fisher importance (docs/methods/lst.md §8): I = Σ_n (∂ℓ_n/∂θ)² over single training examples.

A one-off cost at full fine-tuning memory: every backbone weight requires grad for the duration, and
one float32 accumulator per weight is kept. Gradients are taken with `torch.autograd.grad`, so no
`.grad` is written anywhere and no weight changes. The model runs in eval mode (dropout off), which
the paper does not specify.
"""
from __future__ import annotations

import warnings

import torch


def single_examples(batch: dict):
    """Split a batch (dict of tensors with a leading batch axis) into batches of one example."""
    tensors = {k: v for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0}
    size = next(iter(tensors.values())).shape[0]
    for i in range(size):
        yield {k: (v[i:i + 1] if k in tensors else v) for k, v in batch.items()}


def fisher_importance(model, batches, samples: int) -> tuple[dict[str, torch.Tensor], int]:
    """Returns ({backbone parameter name in `model`: accumulated squared gradient}, examples used)."""
    named = [(f"backbone.{n}", p) for n, p in model.backbone.named_parameters()]
    params = [p for _, p in named]
    device = params[0].device
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
    was_training = model.training
    model.eval()
    used = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            for example in single_examples(batch):
                example = {k: v.to(device) if torch.is_tensor(v) else v for k, v in example.items()}
                loss = model.pretrained_loss(example)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for (n, _), g in zip(named, grads):
                    if g is not None:
                        acc[n] += g.float().pow(2)
                used += 1
                if used == samples:
                    return acc, used
    finally:
        for p in params:
            p.requires_grad_(False)
        model.train(was_training)
    if used == 0:
        raise ValueError("lst: Fisher initialisation got no examples")
    warnings.warn(f"lst: Fisher importance from {used} examples (asked for {samples}); the data ran out",
                  stacklevel=3)
    return acc, used

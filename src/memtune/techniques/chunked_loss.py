"""Chunked LM cross-entropy (`+chunked_ce`): the vocabulary-wide loss without the vocabulary-wide logits.

    loss = chunked_lm_loss(h, targets, head, params)
    # == F.cross_entropy(head(h).float(), targets, ignore_index=-100), without head(h) ever whole

A causal LM's loss reads N×V logits (SmolLM2 at 8 × 1024 tokens: 8,192 × 49,152 in fp32 = 1.5 GiB), and autograd
keeps them, their softmax and the gradient for backward: several GiB that every method pays, the memory-
efficient ones included. Here the rows are processed `chunk_rows` at a time, and each chunk's gradient is taken
*in the forward pass*, while its logits exist:

    forward, per chunk c:  z_c = head(h_c).float()       (chunk_rows × V, freed before the next chunk)
                           ℓ_c = Σ_rows CE(z_c, y_c) / N  (N = the real targets of the whole batch)
                           g_h[c], g_θ += ∂ℓ_c/∂h_c, ∂ℓ_c/∂θ   (θ: the head's trainable parameters)
    backward:              ∂L/∂h = g_h · ∂L/∂loss,  ∂L/∂θ = g_θ · ∂L/∂loss

The loss is a scalar, so its gradient is the stored one scaled by the incoming gradient: nothing is recomputed
and the arithmetic is the plain loss's (same matmuls, fp32 softmax), summed in another order. What stays
alive between forward and backward is g_h (N×d, the size of h) and g_θ; the transient peak is one chunk's
logits and their gradient.

Used by `MemtuneModel.forward` for the causal-LM and seq2seq objectives while autograd records (training);
under `torch.no_grad()` (evaluation, generation) the model returns its logits as without the technique.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOGIT_CHUNK_ELEMENTS = 2 ** 24       # one chunk's fp32 logits: 64 MiB, whatever the vocabulary


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: 2^24 / V (341 for SmolLM2's 49,152 words, 524 for Llama 2's 32,000)."""
    return max(1, LOGIT_CHUNK_ELEMENTS // max(1, vocab_size))


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, targets, head, chunk_rows, *params):
        # h: N×d, targets: N ids (-100: no loss), params: the head's trainable parameters. The real-target
        # count stays a tensor (no host sync; the planner's meta tensors have no values).
        n = (targets != -100).sum()
        rows = h.shape[0]
        grad_h = torch.empty_like(h)
        grad_params: list = [None] * len(params)        # allocated for the parameters the head uses only
        loss = h.new_zeros((), dtype=torch.float32)
        for start in range(0, rows, chunk_rows):
            with torch.enable_grad():
                h_c = h[start:start + chunk_rows].detach().requires_grad_(True)
                z = head(h_c).float()                                              # chunk × V
                loss_c = F.cross_entropy(z, targets[start:start + chunk_rows], reduction="sum",
                                         ignore_index=-100) / n
                grads = torch.autograd.grad(loss_c, [h_c, *params], allow_unused=True)
            grad_h[start:start + chunk_rows] = grads[0]
            for k, g in enumerate(grads[1:]):
                if g is not None:
                    grad_params[k] = g if grad_params[k] is None else grad_params[k] + g
            loss += loss_c.detach()
            del z, loss_c, grads, h_c
        ctx.used = [g is not None for g in grad_params]
        ctx.save_for_backward(grad_h, *(g for g in grad_params if g is not None))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, *stored = ctx.saved_tensors
        stored = iter(stored)
        grad_params = [next(stored) if used else None for used in ctx.used]
        return (grad_h * grad_loss.to(grad_h.dtype), None, None, None,
                *(None if g is None else g * grad_loss.to(g.dtype) for g in grad_params))


def chunked_lm_loss(h: torch.Tensor, targets: torch.Tensor, head, params=(), chunk_rows: int | None = None,
                    vocab_size: int | None = None) -> torch.Tensor:
    """Mean token cross-entropy of head(h) against targets, one chunk of rows at a time.

    h: …×d token states (the head's input), targets: … ids with -100 where no loss is taken (padding, the
    prompt), head: …×d → …×V logits (the frozen LM head, with any scale or soft-cap of the family), params: the
    parameters that may train (e.g. every trainable parameter of the model: those the head does not use get no
    gradient and no buffer; full fine-tuning's tied embedding gets the loss's share of its gradient).
    chunk_rows: rows per chunk (default `default_chunk_rows(vocab_size)`; one of the two is needed).
    Equals F.cross_entropy(head(h).float().flatten(0, -2), targets.flatten(), ignore_index=-100), NaN included
    when no target is real; gradients reach h and params only.
    """
    if chunk_rows is None:
        if vocab_size is None:
            raise ValueError("chunked_lm_loss needs chunk_rows or vocab_size")
        chunk_rows = default_chunk_rows(vocab_size)
    if chunk_rows < 1:
        raise ValueError(f"chunked_lm_loss: chunk_rows must be >= 1, got {chunk_rows}")
    rows, flat = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if rows.shape[0] != flat.shape[0]:
        raise ValueError(f"chunked_lm_loss: {rows.shape[0]} token states but {flat.shape[0]} targets")
    params = [p for p in params if p.requires_grad]
    return _ChunkedLMLoss.apply(rows, flat, head, chunk_rows, *params)

"""A linear map over a frozen input whose saved copy of that input is compact.

A side network reads frozen backbone outputs ("taps", B×T×d, no gradient) through trainable maps
(ladders, down-projections). For the weight gradient dL/dW = gᵀ·x autograd keeps x at full width and
precision until backward: one B×T×d tensor per tap. The input gradient is never needed (x is a constant),
so x may be kept in a smaller form, and dL/dW computed from the dequantized copy:

    tap_storage = "full"   x itself                                   4 bytes / element (fp32)
                = "bf16"   x rounded to bfloat16                      2 bytes / element
                = "int8"   q = round(x / s), s = absmax(x_row) / 127  1 byte / element + 4 bytes / row
                           (symmetric, one scale per token row)

The forward output is always computed from the full x, so only the weight (and bias) gradient changes.
Error of the dequantized copy x̂ per element: bf16 |x̂ − x| ≤ 2⁻⁸·|x| (round to nearest, 8 significand
bits); int8 |x̂ − x| ≤ s/2 = absmax(x_row)/254.

    y = frozen_input_linear(x, weight, bias, "bf16")     # x: …×in (no grad) → …×out
    layer = TapLinear(d, d_side, tap_storage="int8")      # an nn.Linear that uses it when its input is frozen
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TAP_STORAGES = ("full", "bf16", "int8")


def _compress(x: torch.Tensor, storage: str):
    """x: …×n → what is saved: (x,), (x_bf16,) or (q int8 …×n, scale fp32 …×1)."""
    if storage == "full":
        return (x,)
    if storage == "bf16":
        return (x.to(torch.bfloat16),)
    absmax = x.detach().abs().amax(dim=-1, keepdim=True).float()                 # …×1
    scale = absmax / 127.0
    q = torch.round(x.float() / scale.clamp_min(torch.finfo(torch.float32).tiny)).clamp_(-127, 127)
    return q.to(torch.int8), scale


def _restore(saved, storage: str, dtype: torch.dtype) -> torch.Tensor:
    if storage == "full":
        return saved[0]
    if storage == "bf16":
        return saved[0].to(dtype)
    q, scale = saved
    return (q.float() * scale).to(dtype)


def compact_bytes(shape: tuple[int, ...], storage: str, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one saved input of `shape` takes under `storage` (for planners and tests)."""
    n = 1
    for s in shape:
        n *= s
    rows = n // shape[-1]
    if storage == "full":
        return n * torch.empty((), dtype=dtype).element_size()
    if storage == "bf16":
        return 2 * n
    return n + 4 * rows


class _FrozenInputLinear(torch.autograd.Function):
    """y = x·Wᵀ + b for an x that needs no gradient; saves x in the compact form `storage`."""

    @staticmethod
    def forward(ctx, x, weight, bias, storage: str):
        if ctx.needs_input_grad[0]:
            raise RuntimeError("frozen_input_linear: the input requires grad; this map is only for frozen taps")
        out = F.linear(x, weight, bias)                      # exact: computed from the full x
        ctx.storage = storage
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        saved = _compress(x, storage)
        ctx.n_x = len(saved)
        ctx.save_for_backward(*saved, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        *saved, weight = ctx.saved_tensors
        grad_w = grad_b = None
        g = grad.reshape(-1, grad.shape[-1])                             # (Π…)×out
        if ctx.needs_input_grad[1]:
            x = _restore(saved, ctx.storage, ctx.x_dtype)
            grad_w = (g.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)).to(weight.dtype)   # out×in
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(weight.dtype)
        return None, grad_w, grad_b, None


def frozen_input_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        storage: str = "full") -> torch.Tensor:
    """F.linear(x, weight, bias) for a frozen x (no gradient), saving x as `storage` for the weight gradient.

    Falls back to plain F.linear when nothing would be saved (no grad mode, or frozen weight and bias).
    Raises if x requires grad (its gradient cannot be computed from a compact copy).
    """
    if storage not in TAP_STORAGES:
        raise ValueError(f"tap_storage must be one of {', '.join(TAP_STORAGES)}, got {storage!r}")
    needs = weight.requires_grad or (bias is not None and bias.requires_grad)
    if not torch.is_grad_enabled() or not needs:
        return F.linear(x, weight, bias)
    return _FrozenInputLinear.apply(x, weight, bias, storage)


class TapLinear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) that saves a frozen input compactly.

    With `tap_storage="full"`, or when the input requires grad (it is not a frozen tap), it is exactly
    nn.Linear. Otherwise it calls `frozen_input_linear` with its storage.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, tap_storage: str = "full",
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if tap_storage not in TAP_STORAGES:
            raise ValueError(f"tap_storage must be one of {', '.join(TAP_STORAGES)}, got {tap_storage!r}")
        self.tap_storage = tap_storage

    def forward(self, x):
        if self.tap_storage == "full" or x.requires_grad:
            return F.linear(x, self.weight, self.bias)
        return frozen_input_linear(x, self.weight, self.bias, self.tap_storage)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tap_storage={self.tap_storage}"

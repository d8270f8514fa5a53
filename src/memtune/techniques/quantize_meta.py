"""A meta-device stand-in for bitsandbytes' quantized linears, for `memtune plan`.

bitsandbytes quantizes real values (a meta tensor has none), so the planner swaps each frozen block
linear for `QuantizedLinearStandIn`: the same storage and the same working memory as the bnb layer on
the modelled step, without values.

Storage per layer of n = out × in weights (what `bnb.nn.Linear4bit` / `Linear8bitLt` hold):
    nf4 / fp4   weight: ceil(n/2) bytes (two 4-bit codes per byte; the Parameter the optimizer never sees)
                absmax: one uint8 per 64-weight block (double quantization), their fp32 scales: one per
                256 absmax values, one fp32 offset, the 16-entry code book and the 256-entry
                second-level code book (fp32 each)
    int8        weight: n bytes (int8), one fp32 scale per output row
The weight is a frozen Parameter, as bnb's is. bnb keeps the constants in a `quant_state` object beside
the weight; here they are frozen Parameters too, so that every byte figure of a plan (weights, start,
peak: what a GPU allocates) includes them. `quant_constant_bytes` counts them.

Working memory (bitsandbytes 0.50's kernels, CPU and default backends): a 4-bit forward unpacks the codes
to an int32 tensor of n, looks them up in the code book (fp32, n), scales by the absmax (fp32, n; the
dequantized weight) and multiplies; its backward dequantizes again for the input gradient and keeps
nothing but the packed weight. An int8 forward in training dequantizes to the compute dtype (n), keeps the
input for backward (as a Function attribute, so it is not offloaded by saved-tensor hooks) and dequantizes
again in backward. The stand-in allocates the same tensors in the same order on meta.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .quantize import BLOCKSIZE, NESTED_BLOCKSIZE


def quantized_weight_bytes(numel: int, kind: str, out_features: int) -> tuple[int, int]:
    """(weight bytes, constant bytes) of one quantized layer with `numel` weights (see module doc)."""
    if kind == "int8":
        return numel, 4 * out_features
    blocks = math.ceil(numel / BLOCKSIZE)
    constants = blocks + 4 * math.ceil(blocks / NESTED_BLOCKSIZE) + 4 + 4 * 16 + 4 * 256
    return (numel + 1) // 2, constants


def _dequantize_4bit(n: int, shape, dtype, device) -> torch.Tensor:
    codes = torch.empty(n, dtype=torch.int32, device=device)          # unpacked 4-bit codes
    looked_up = torch.empty(n, dtype=torch.float32, device=device)    # code book values
    del codes
    weight = torch.empty(n, dtype=torch.float32, device=device)       # × absmax: the dequantized weight
    del looked_up
    weight = weight.reshape(shape)
    return weight if dtype == torch.float32 else weight.to(dtype)


class _FourBitMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, bias, shape, blocks):
        scales = torch.empty(blocks, dtype=torch.float32, device=x.device)   # double-quant absmax → fp32
        w = _dequantize_4bit(math.prod(shape), shape, x.dtype, x.device)
        del scales
        ctx.shape, ctx.has_bias = shape, bias is not None
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        w = _dequantize_4bit(math.prod(ctx.shape), ctx.shape, grad.dtype, grad.device)
        grad_x = torch.matmul(grad, w) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None


class _Int8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        w = torch.empty(weight.shape, dtype=x.dtype, device=x.device)      # CB → compute dtype, × scale
        ctx.x = x                                                           # bnb keeps A as an attribute
        ctx.shape = tuple(weight.shape)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        w = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device)
        grad_x = torch.matmul(grad, w) if ctx.needs_input_grad[0] else None
        ctx.x = None
        return grad_x, None, None


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantizedLinearStandIn(nn.Module):
    """Storage and compute shape of a bnb quantized linear on any device (see the module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None, kind: str, device, dtype):
        super().__init__()
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.compute_dtype = dtype
        n = in_features * out_features
        if kind == "int8":
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                       requires_grad=False)
            self.row_scale = _frozen(torch.empty(out_features, dtype=torch.float32, device=device))
        else:
            self.weight = nn.Parameter(torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device),
                                       requires_grad=False)
            blocks = math.ceil(n / BLOCKSIZE)
            self.blocks = blocks
            for name, size, dt in (("absmax", blocks, torch.uint8),
                                   ("nested_absmax", math.ceil(blocks / NESTED_BLOCKSIZE), torch.float32),
                                   ("offset", 1, torch.float32), ("code", 16, torch.float32),
                                   ("nested_code", 256, torch.float32)):
                setattr(self, name, _frozen(torch.empty(size, dtype=dt, device=device)))
        self.bias = bias

    @classmethod
    def like(cls, linear: nn.Linear, kind: str) -> "QuantizedLinearStandIn":
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        new = cls(linear.in_features, linear.out_features, bias, kind, linear.weight.device, linear.weight.dtype)
        new.train(linear.training)
        return new

    @property
    def quant_constant_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for n, p in self.named_parameters() if n not in ("weight", "bias"))

    def forward(self, x):
        x = x.to(self.compute_dtype)
        if self.kind == "int8":
            if self.training:
                return _Int8Matmul.apply(x, self.weight, self.bias)
            return F.linear(x, torch.empty(self.weight.shape, dtype=x.dtype, device=x.device), self.bias)
        return _FourBitMatmul.apply(x, self.weight, self.bias, (self.out_features, self.in_features), self.blocks)

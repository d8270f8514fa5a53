"""Where a model really rounds, and how to make a float64 model round in float64 only (MEFT tests).

transformers upcasts some operations to float32 "for stability": Llama's RMSNorm casts its input to float32
and back, and the eager attention of Llama and ViT takes its softmax with dtype=float32. In a float32 model
that changes nothing; in a float64 model these are float32 islands: their outputs carry float32 rounding
(u ≈ 6e-8) however the streams are stored. MEFT's inverse recomputes F and G at inputs that differ from
the forward's by ~1e-16 relative, which flips a few of those float32 roundings (which ones depends on the
CPU's vector kernels), and the flip is then amplified by 1/λ, 1/β per layer.

`working_precision` finds the least precise dtype any operation inside F and G produces, so a bound can use
the unit roundoff of that dtype. `stream_precision_throughout` removes the islands instead, so a float64
test computes the forward, the inverse and ordinary autograd all in float64.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

from memtune.methods.meft.coupling import TwoStream, _replay


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p for a p-bit significand (round to nearest): the largest relative error of one rounding."""
    return torch.finfo(dtype).eps / 2


def _less_precise(dtype, than: torch.dtype) -> bool:
    return (isinstance(dtype, torch.dtype) and dtype.is_floating_point
            and torch.finfo(dtype).eps > torch.finfo(than).eps)


class FloatDtypes(TorchFunctionMode):
    """Records the dtype of every floating-point tensor a torch operation returns while active."""

    def __init__(self):
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.seen.add(t.dtype)
        return out


@torch.no_grad()
def working_precision(stream: TwoStream, layers, states, rngs) -> torch.dtype:
    """The least precise floating-point dtype any operation of F or G produces on these states.

    states[j] is the input pair of layers[j] and rngs[j] its F/G generator states (`exact_states`).
    """
    rec = FloatDtypes()
    with rec:
        for j, n in enumerate(layers):
            x1, x2 = states[j]
            rf, rg = rngs[j]
            with _replay(rf):
                f = stream.F(n, x2)
            with _replay(rg):
                stream.G(n, stream.lam * x1 + f)
    return max(rec.seen, key=lambda dt: torch.finfo(dt).eps)


class SamePrecision(TorchFunctionMode):
    """While active, no floating-point tensor is cast to a less precise float: `Tensor.to(float32)` and
    `.float()` of a float64 tensor keep float64, and so does a `dtype=float32` argument (softmax)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        x = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() else None
        if x is not None:
            if func is torch.Tensor.float and x.dtype == torch.float64:
                return x
            if func is torch.Tensor.to and len(args) > 1 and _less_precise(args[1], x.dtype):
                args = (x, x.dtype, *args[2:])
            if _less_precise(kwargs.get("dtype"), x.dtype):
                kwargs["dtype"] = x.dtype
        return func(*args, **kwargs)


@contextmanager
def stream_precision_throughout():
    """Run every F and G of the MEFT coupling under `SamePrecision`: in the forward, the inverse, the
    backward's recomputation and ordinary autograd alike. (A mode entered around `loss.backward()` does
    not reach a custom Function's backward, so it is entered where F and G are called.)"""
    originals = TwoStream.F, TwoStream.G

    def wrapped(method):
        def run(self, n, x):
            with SamePrecision():
                return method(self, n, x)
        return run

    TwoStream.F, TwoStream.G = wrapped(originals[0]), wrapped(originals[1])
    try:
        yield
    finally:
        TwoStream.F, TwoStream.G = originals

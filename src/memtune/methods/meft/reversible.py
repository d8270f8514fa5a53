"""The reversible autograd Function over a span of MEFT layers (docs/methods/meft.md §6).

Forward runs the span without a graph and saves only its top output (B×T×2d); backward walks the
layers from the top, recomputing each layer's inputs from its outputs and replaying the dropout masks
from the generator states recorded per F/G call.

* Autocast: `torch.amp.custom_fwd/custom_bwd` make the backward's recomputation run under the same
  autocast state (device type and dtype) as the forward, so recomputed F/G outputs match the forward's
  dtype and values; one Function class exists per device type, since the decorators take it.
* Parameters: the span's trainable tensors are inputs of the Function and their gradients are returned
  by `backward` (no `.grad` side effects), so the outer graph lists them. DDP (also through Accelerate)
  therefore sees every adapter as used in the forward and its reducer hooks fire normally:
  `find_unused_parameters` is not needed (False works, and True, as memtune's trainer sets, works too).
* Memory (encoder-decoders): the decoder's F/G read the encoder's finished output from ctx. It is an input
  of the Function too (`Span.inputs`, saved for backward: one B×Ts×d tensor, shared with the graph above);
  the backward recomputes F and G reading a leaf copy of it and returns ∂L/∂memory, summed over the span's
  layers, so the gradient reaches the encoder's adapters through the encoder's own span.
* Segments: a span saves its top output; a span that starts at another span's output also keeps that
  input (the same storage, no extra bytes) and, in backward, compares its recomputed input with it:
  the measured error of the deepest reconstruction, reported to `span.on_error` at every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .coupling import TwoStream


def relative_error(rec: tuple[torch.Tensor, ...], ref: tuple[torch.Tensor, ...]) -> float:
    """max over streams of ‖rec − ref‖ / ‖ref‖ (Frobenius), in float64; inf if not finite."""
    worst = 0.0
    for r, t in zip(rec, ref):
        num = torch.linalg.vector_norm((r.double() - t.double())).item()
        den = torch.linalg.vector_norm(t.double()).item()
        e = num / den if den > 0 else num
        worst = max(worst, e if e == e else float("inf"))
    return worst


@dataclass
class Span:
    """What one application of the Function covers: consecutive backbone layers of a TwoStream."""
    stream: TwoStream
    layers: list[int]
    check_input: bool = False                       # keep the input (another span's output) to measure
    on_error: Callable[[float], None] | None = None
    params: list[torch.Tensor] = field(init=False)  # the span's trainable tensors, in a fixed order
    inputs: list[torch.Tensor] = field(init=False)  # ctx tensors F/G read that carry a gradient (memory)

    def __post_init__(self):
        self.inputs = self.stream.grad_inputs()
        seen, self.params = set(), []
        for n in self.layers:
            for p in self.stream.params_F(n) + self.stream.params_G(n):
                if id(p) not in seen:
                    seen.add(id(p))
                    self.params.append(p)


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B×T×2d → two contiguous B×T×d streams.

    Contiguous on purpose: a kernel may round differently on a strided view than on a dense tensor, and
    the inverse only works if F and G recompute bit-identical outputs (a 1-ulp difference is amplified
    by 1/λ per layer). Every stream the forward and backward hand to F/G is therefore dense.
    """
    x1, x2 = x.chunk(2, dim=-1)
    return x1.contiguous(), x2.contiguous()


def _make_function(device_type: str):
    class ReversibleSpan(torch.autograd.Function):
        @staticmethod
        @torch.amp.custom_fwd(device_type=device_type)
        def forward(ctx, span: Span, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
            # x: B×T×2d = [x¹ ‖ x²]; tensors: span.inputs, then span.params. Function.forward runs with grad
            # disabled: no graph, no activations.
            x1, x2 = _halves(x)
            rngs: list = []
            for n in span.layers:
                x1, x2 = span.stream.forward_layer(n, x1, x2, rngs)
            out = torch.cat([x1, x2], dim=-1)       # B×T×2d: the only activation saved for backward
            ctx.span, ctx.rngs = span, rngs
            # Saved: out, the span's inputs (the memory, already held by the graph above), then x if checked.
            ctx.save_for_backward(out, *span.inputs, *([x] if span.check_input else []))
            return out

        @staticmethod
        @torch.amp.custom_bwd(device_type=device_type)
        def backward(ctx, grad_out: torch.Tensor):
            span: Span = ctx.span
            saved = ctx.saved_tensors
            k = len(span.inputs)
            o1, o2 = _halves(saved[0])
            g1, g2 = _halves(grad_out)
            # Leaves F and G read in place of the inputs, so each layer's VJP also gives ∂L/∂input.
            leaves = [t.detach().requires_grad_(True) for t in saved[1:1 + k]]
            input_grads: list = [None] * k
            index = {id(p): i for i, p in enumerate(span.params)}
            grads: list = [None] * len(span.params)
            stream = span.stream
            with stream.reading(leaves):
                for n, rng in zip(reversed(span.layers), reversed(ctx.rngs)):
                    (o1, o2), (g1, g2), pgrads, egrads = stream.backward_layer(n, o1, o2, g1, g2, rng, leaves)
                    for p, g in zip(stream.params_F(n) + stream.params_G(n), pgrads):
                        i = index[id(p)]
                        grads[i] = g if grads[i] is None else grads[i] + g
                    input_grads = [g if a is None else a + g for a, g in zip(input_grads, egrads)]
            if span.check_input and span.on_error is not None:
                span.on_error(relative_error((o1, o2), _halves(saved[1 + k])))
            grad_x = torch.cat([g1, g2], dim=-1) if ctx.needs_input_grad[1] else None
            ctx.span = ctx.rngs = None
            return (None, grad_x, *input_grads, *grads)

    ReversibleSpan.__name__ = ReversibleSpan.__qualname__ = f"ReversibleSpan_{device_type}"
    return ReversibleSpan


_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}


def reversible_span(span: Span, x: torch.Tensor) -> torch.Tensor:
    """Run `span` on x (B×T×2d) storing only its output; gradients flow to x, span.inputs and span.params."""
    fn = _FUNCTIONS.get(x.device.type)
    if fn is None:
        fn = _FUNCTIONS[x.device.type] = _make_function(x.device.type)
    return fn.apply(span, x, *span.inputs, *span.params)

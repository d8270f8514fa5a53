"""Error bounds for MEFT's reversible span, derived from the arithmetic rather than from one machine's run.

The reversible backward recomputes each layer's inputs from its outputs,

    x² = (y² − G(y¹)) / β,        x¹ = (y¹ − F(x²)) / λ,

so a rounding made while inverting layer n is carried down through the inverses of layers n−1 … 0 of its
segment. To first order, errors (d¹, d²) of a layer's (un-swapped) outputs become errors of its inputs

    δx² = (d² − J_G·d¹) / β,      δx¹ = (d¹ − J_F·δx²) / λ                                    (1)

with J_F, J_G the Jacobians of F and G there: the coupling's amplification per layer, ≈ ‖J_F‖/λ for
MEFT1, ‖J_G‖/β for MEFT2 and ‖J_F‖‖J_G‖/(λβ) for MEFT3 (docs/methods/meft.md §9), i.e. about 10, 10 and 100 per layer
with the paper's factors, times the sub-layers' own gains (measured: ~1 for post-LN BERT, up to ~2 for a
pre-norm Llama with small-norm inputs, which is why a fixed factor per variant is not enough).

Each layer's inverse adds fresh rounding, per stream at most u‖y‖ from each of: the forward's multiply-add
that made y (the product's rounding is λ or β times smaller, counted with it), the inverse's subtraction,
its division, and F or G recomputed at a perturbed input, whose own roundings no longer cancel the
forward's: ROUNDINGS_PER_LAYER = 4, with u the unit roundoff of the precision F and G really compute in
(`meft_precision.working_precision`: float32 inside a float64 model's float32 islands).

`span_bounds` injects one unit (a seeded random direction of norm ‖y‖ per stream) at every layer, carries it
down each segment with (1) through forward-mode AD of the model's own F and G (not through the inverse
under test), and bounds the relative error of layer j's recomputed inputs by

    bound_j = MARGIN · ROUNDINGS_PER_LAYER · u · ‖E_j‖ / ‖x_j‖

where E_j is the carried injection in units of u: about the product of the amplifications of the layers
above j in its segment (the amplification to the power of the depth, for equal layers). MARGIN allows
rounding errors to line up with the amplified directions better than a random direction does.

The reversible gradients are ordinary vector-Jacobian products evaluated at the recomputed states, so to
first order their error is the directional derivative of the gradients along the same E, taken here by a
finite difference on the float64 copy. On top come the backward's own roundings, which differ between the
reversible and the ordinary backward (other summation orders) by about one unit per layer and are not
amplified (the backward multiplies cotangents by λ, β ≤ 1 and by the Jacobians' transposes); they dominate
when segments are one layer long. `gradients` bounds the sum with the same constants. Every number is a
property of the model's function and of u, not of which roundings one CPU's vector kernels flip.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from memtune.methods.meft.calibrate import exact_states, uniform_segments
from memtune.methods.meft.coupling import _replay

from .meft_precision import unit_roundoff, working_precision

# Roundings per stream and layer of the inverse, each at most u relative to the layer's output (see above).
ROUNDINGS_PER_LAYER = 4
# Allowance for rounding errors lining up with the amplified directions better than a random direction.
# Measured errors were at most 0.11 of the resulting bounds (float64 and float32, every tiny family and
# variant, single-layer and 2-6-layer segments, ATen CPU capabilities default, avx2 and avx512).
MARGIN = 2.0


def _random_like(ref: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A Gaussian direction with the norm of `ref`: one unit of relative error."""
    r = torch.randn(ref.shape, generator=gen, dtype=ref.dtype)
    return r * (ref.norm() / r.norm())


def propagated_errors(stream, layers, states, rngs, segments, seed: int = 0):
    """E_j for every layer (bottom first): the unit injections of the layers at and above j in its segment,
    carried down by (1). states[j]: the input pair of layers[j] (states[-1]: the top output)."""
    tops = {seg[-1] for seg in segments}
    gen = torch.Generator().manual_seed(seed)
    errs: list = [None] * len(layers)
    d1 = d2 = None                                   # error of the stored output pair of layer j
    for j in reversed(range(len(layers))):
        n = layers[j]
        rf, rg = rngs[j]
        if n in tops:                                # a segment starts from an exact stored state
            d1 = d2 = None
        o1, o2 = states[j + 1]
        y1, y2 = (o2, o1) if stream.swap else (o1, o2)
        e1, e2 = _random_like(y1, gen), _random_like(y2, gen)
        if d1 is not None:
            u1, u2 = (d2, d1) if stream.swap else (d1, d2)
            e1, e2 = e1 + u1, e2 + u2

        def g_of(y, rng=rg, n=n):
            with _replay(rng):
                return stream.G(n, y)

        def f_of(x, rng=rf, n=n):
            with _replay(rng):
                return stream.F(n, x)

        _, jg = torch.func.jvp(g_of, (y1,), (e1,))
        dx2 = (e2 - jg) / stream.beta
        _, jf = torch.func.jvp(f_of, (states[j][1],), (dx2,))
        dx1 = (e1 - jf) / stream.lam
        errs[j] = d1, d2 = dx1, dx2                  # the input pair of layer j: layer j−1's stored output
    return errs


def gradients_from_states(stream, layers, states, rngs, top_cotangent):
    """Gradients of the span's trainable tensors (by id) and of h₀ (x¹ = x² = h₀), each layer's
    vector-Jacobian product taken at the given input states: what the reversible backward computes from
    its recomputed states (ordinary autograd when the states are exact)."""
    g1, g2 = top_cotangent
    grads: dict = {}
    for j in reversed(range(len(layers))):
        n = layers[j]
        rf, rg = rngs[j]
        params = stream.params_F(n) + stream.params_G(n)
        with torch.enable_grad():
            x1, x2 = (s.detach().requires_grad_(True) for s in states[j])
            with _replay(rf):
                y1 = stream.lam * x1 + stream.F(n, x2)
            with _replay(rg):
                y2 = stream.beta * x2 + stream.G(n, y1)
            out = (y2, y1) if stream.swap else (y1, y2)
            g1, g2, *pg = torch.autograd.grad(out, [x1, x2, *params], (g1, g2), allow_unused=True)
        for p, g in zip(params, pg):
            if g is not None:
                grads[id(p)] = grads[id(p)] + g if id(p) in grads else g
    grads["h0"] = g1 + g2
    return grads


@dataclass
class SpanBounds:
    precision: torch.dtype           # where F and G round (their least precise dtype)
    unit_roundoff: float
    segments: list[list[int]]
    layer_gain: list[float]          # ‖E_j‖/‖x_j‖ per reversible layer, bottom first (units of u)
    gradient_gain: float             # max over tensors of the gradients' relative change along E (units of u)
    depth: int                       # reversible layers: one unit of the backward's own rounding each

    @property
    def _scale(self) -> float:
        return MARGIN * ROUNDINGS_PER_LAYER * self.unit_roundoff

    @property
    def layer_bounds(self) -> list[float]:
        """Bound on each layer's relative reconstruction error (bottom first)."""
        return [self._scale * g for g in self.layer_gain]

    @property
    def inputs(self) -> float:
        """Bound on the largest relative reconstruction error in the span."""
        return max(self.layer_bounds)

    @property
    def gradients(self) -> float:
        """Bound on the largest per-tensor relative gradient error against ordinary autograd."""
        return self._scale * (self.gradient_gain + self.depth)

    def __str__(self) -> str:
        return (f"rounding in {str(self.precision).replace('torch.', '')} (u={self.unit_roundoff:.1e}): input "
                f"error bounds {', '.join(f'{b:.1e}' for b in self.layer_bounds)} (bottom first), gradient error "
                f"bound {self.gradients:.1e}")


def _relative(err_pair, state_pair) -> float:
    return max((e.norm() / s.norm()).item() for e, s in zip(err_pair, state_pair))


def span_bounds(model, batch, segment_layers: int | None = None, loss_of_top=None, seed: int = 0) -> SpanBounds:
    """Bounds for the reversible layers of a wrapped MEFT `model` on `batch`, in segments of `segment_layers`
    (default: the model's segments, else one segment).

    u is that of the model as it is (its dtype, float32 islands included); the gains are properties of the
    real-valued function, computed on a float64 copy. `loss_of_top(model64, x1, x2, ctx)` gives the scalar
    loss from the span's top streams, whose cotangent weights the gradient bound (default: a fixed random
    cotangent). The global random generators are left as they were.
    """
    layers = list(model.reversible_indices)
    segments = (uniform_segments(layers, segment_layers) if segment_layers
                else model.segments or [layers])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        h, ctx = model.embed(batch)
        stream = model.two_stream(ctx, h.dtype)
        s = h.to(stream.stream_dtype)
        precision = working_precision(stream, layers, *exact_states(stream, layers, s, s))

        wide = copy.deepcopy(model).to(torch.float64)
        torch.manual_seed(seed)
        h, ctx = wide.embed({k: v.double() if v.is_floating_point() else v for k, v in batch.items()})
        stream = wide.two_stream(ctx, torch.float64)
        states, rngs = exact_states(stream, layers, h, h)
        errs = propagated_errors(stream, layers, states, rngs, segments, seed)
        layer_gain = [_relative(e, x) for e, x in zip(errs, states)]

        top = states[-1]
        if loss_of_top is None:
            gen = torch.Generator().manual_seed(seed + 1)
            cot = tuple(torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in top)
        else:
            with torch.enable_grad():
                t1, t2 = (t.detach().requires_grad_(True) for t in top)
                cot = torch.autograd.grad(loss_of_top(wide, t1, t2, ctx), [t1, t2])
        exact = gradients_from_states(stream, layers, states, rngs, cot)
        # Finite difference along E, the step √u relative at the most perturbed layer (u of the copy's own
        # rounding: float32 islands stay float32), so truncation and rounding both stay near √u of it.
        step = unit_roundoff(working_precision(stream, layers, states, rngs)) ** 0.5 / max(layer_gain)
        moved = [tuple(x + step * e for x, e in zip(xs, es)) for xs, es in zip(states[:-1], errs)] + [top]
        moved_grads = gradients_from_states(stream, layers, moved, rngs, cot)
        gradient_gain = max(((moved_grads[k] - g).norm() / (step * g.norm())).item()
                            for k, g in exact.items() if g.norm() > 0)
    return SpanBounds(precision, unit_roundoff(precision), segments, layer_gain, gradient_gain, len(layers))

"""Error control beyond the paper: measure how well the reversible span recomputes its inputs, and cut
the span into segments that keep the error within tolerance.

The inverse divides by λ and β at every layer, so a rounding error grows by about ‖J‖/λ per layer
(docs/methods/meft.md §9): ~10× per layer for λ = 0.1 in float32, which a 30-layer span cannot afford. Segments bound
the growth: each restarts from a stored, exact B×T×2d state. The measurement replays exactly what the
backward does (same ops, same dropout masks, same precision) on a real batch.

Automatic segmentation is greedy from the top: invert layer after layer from the exact top state and
cut a segment boundary below the last layer whose recomputed input is still within the target; restart
from the exact state there. Each segment is as long as the measured error allows (ill-conditioned layers
get short segments, well-conditioned stretches long ones), and the whole search costs at most two
inversions per layer. Greedy maximal extension gives the fewest segments, because a shorter segment
restarting from an exact state is never worse than the longer one it was cut from.

The input error is a proxy; what training needs is the gradient. So the chosen segments are checked:
the adapter gradients of the reversible span are compared with ordinary autograd on the first rows of
the batch (a fixed random cotangent on the span's output, the same dropout masks), and the input target
is tightened while they exceed the tolerance (docs/methods/meft.md §9: measure the inversion error *and* the gradient
agreement on the actual checkpoint and dtype before training). Everything runs inside a forked random
generator, so calibrating does not change the training run's dropout masks.

The functions below that take `model` read only its `reversible_indices` and `two_stream(ctx, dtype)`: a
MEFT model (its single or encoder stack) or a `StackView` of an encoder-decoder's decoder, which is
calibrated on its own streams.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .coupling import TwoStream
from .reversible import Span, relative_error, reversible_span

# The automatic segmentation first aims the input error at tolerance / HEADROOM, then checks the adapter
# gradients against ordinary autograd and divides the target by HEADROOM again while they exceed the
# tolerance (at most MAX_TIGHTEN times). Measured in float32: the same layers recomputed with other dropout
# masks differed by up to 2.6× in error (MiniLM); the worst per-tensor gradient error was 0.1–1.2× the
# largest input error on MiniLM and up to 5.4× on SmolLM2-135M (MEFT2, a down-projection bias whose
# gradient is a sum over tokens with cancellation) — hence the gradient check rather than a fixed margin.
HEADROOM = 4.0
MAX_TIGHTEN = 3
# Under bf16/fp16 autocast no segmentation reaches 1e-3: even single-layer segments (inputs recomputed to
# ~3e-7) give gradients that differ from ordinary autograd by ~3e-3 on the tiny BERT, because a 1e-7
# change flips some bf16 roundings; both differ from the float32 gradient by ~9e-3. That single-layer
# error is the precision's floor, and a segmentation is accepted within FLOOR_FACTOR × floor of it.
FLOOR_FACTOR = 2.0
# Rows of the calibration batch used for the gradient check (it stores activations like ordinary autograd).
GRADIENT_ROWS = 2


@dataclass
class ReconstructionReport:
    """Per-layer relative error of the recomputed inputs of the reversible span against the forward's."""
    layers: list[int]                      # backbone indices of the reversible layers, bottom first
    segments: list[list[int]]              # the segmentation the errors were measured with
    errors: list[float]                    # error of each layer's recomputed input pair
    tolerance: float
    stream_dtype: str
    batch_shape: tuple[int, ...]
    automatic: bool = False
    gradient_error: float | None = None    # max per-tensor relative error of the span's adapter gradients
    gradient_floor: float | None = None    # the same with single-layer segments (measured if needed)

    @property
    def gradient_limit(self) -> float:
        """What the adapter gradients' error is held to: the tolerance, or the precision floor's multiple."""
        return max(self.tolerance, FLOOR_FACTOR * (self.gradient_floor or 0.0))

    @property
    def max_error(self) -> float:
        return max(self.errors, default=0.0)

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance and (self.gradient_error or 0.0) <= self.gradient_limit

    def __str__(self) -> str:
        per = ", ".join(f"{n}:{e:.1e}" for n, e in zip(self.layers, self.errors))
        grad = f", adapter gradients {self.gradient_error:.2e}" if self.gradient_error is not None else ""
        if self.gradient_floor is not None:
            grad += f" (precision floor {self.gradient_floor:.2e} with single-layer segments)"
        return (f"reconstruction error on a {'×'.join(map(str, self.batch_shape))} batch with {self.stream_dtype} "
                f"streams, {describe_segments(self.segments)}{' (automatic)' if self.automatic else ''}: max "
                f"{self.max_error:.2e}{grad} ({'within' if self.ok else 'ABOVE'} tolerance {self.tolerance:g}); "
                f"per layer {per}")


def describe_segments(segments: list[list[int]]) -> str:
    if not segments:
        return "no reversible layers"
    parts = [f"{s[0]}-{s[-1]}" if len(s) > 1 else str(s[0]) for s in segments]
    return f"{len(segments)} segment(s) [{', '.join(parts)}]"


def uniform_segments(layers: list[int], k: int) -> list[list[int]]:
    return [layers[i:i + k] for i in range(0, len(layers), k)]


@torch.no_grad()
def exact_states(stream: TwoStream, layers: list[int], x1, x2):
    """Forward over `layers` keeping every input pair (len(layers) + 1 pairs) and the F/G generator states."""
    states, rngs = [(x1, x2)], []
    for n in layers:
        x1, x2 = stream.forward_layer(n, x1, x2, rngs)
        states.append((x1, x2))
    return states, rngs


@torch.no_grad()
def segment_errors(stream: TwoStream, layers: list[int], states, rngs, segments) -> list[float]:
    """Invert each segment from its exact top state: error of every layer's recomputed input pair."""
    pos = {n: j for j, n in enumerate(layers)}
    errors = [0.0] * len(layers)
    for seg in segments:
        o1, o2 = states[pos[seg[-1]] + 1]
        for n in reversed(seg):
            j = pos[n]
            o1, o2 = stream.inverse_layer(n, o1, o2, rngs[j])
            errors[j] = relative_error((o1, o2), states[j])
    return errors


@torch.no_grad()
def greedy_segments(stream: TwoStream, layers: list[int], states, rngs, target: float):
    """Longest segments from the top whose recomputed inputs stay within `target` (see module docstring).

    Returns (segments bottom first, per-layer errors). A single layer above target stays a segment of
    its own (nothing shorter exists); the caller reports it.
    """
    errors = [0.0] * len(layers)
    cuts = []                                   # segment tops (exclusive end index into layers)
    top, j = len(layers), len(layers) - 1
    o = states[top]
    while j >= 0:
        rec = stream.inverse_layer(layers[j], *o, rngs[j])
        e = relative_error(rec, states[j])
        if e > target and j < top - 1:          # cut below layer j+1; redo layer j from its exact output
            cuts.append(top)
            top, o = j + 1, states[j + 1]
            continue
        errors[j], o, j = e, rec, j - 1
    cuts.append(top)
    bounds = sorted([0] + cuts)
    segments = [layers[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    return segments, errors


def slice_rows(obj, batch: int, rows: int):
    """The first `rows` rows of every tensor in a (nested) ctx whose leading dimension is the batch."""
    if torch.is_tensor(obj):
        return obj[:rows] if obj.dim() > 0 and obj.shape[0] == batch and batch > 1 else obj
    if isinstance(obj, dict):
        return {k: slice_rows(v, batch, rows) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_rows(v, batch, rows) for v in obj)
    return obj


def gradient_error(model, h: torch.Tensor, ctx, segments, rows: int = GRADIENT_ROWS) -> float:
    """Max per-tensor relative error of the reversible span's adapter gradients against ordinary autograd.

    Run on the first `rows` rows of (h₀, ctx) with a fixed random cotangent on the span's output and the
    same dropout masks in both runs (the same seed; both consume the generator identically).
    """
    b = h.shape[0]
    m = min(rows, b)
    stream = model.two_stream(slice_rows(ctx, b, m), h.dtype)
    s = h[:m].detach().to(stream.stream_dtype)
    layers = model.reversible_indices
    params = [p for n in layers for p in stream.params_F(n) + stream.params_G(n)]
    gen = torch.Generator(device=s.device).manual_seed(0)
    probe = torch.randn(s.shape[:-1] + (2 * s.shape[-1],), generator=gen, device=s.device, dtype=s.dtype)
    devices = [s.device] if s.device.type == "cuda" else []

    def grads(reversible: bool):
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.manual_seed(0)
            if reversible:
                x = torch.cat([s, s], dim=-1)
                for seg in segments:
                    x = reversible_span(Span(stream, seg), x)
            else:
                x1 = x2 = s
                for n in layers:
                    x1, x2 = stream.forward_layer(n, x1, x2)
                x = torch.cat([x1, x2], dim=-1)
            return torch.autograd.grad((x * probe).sum(), params)

    ref, got = grads(False), grads(True)
    worst = 0.0
    for r, g in zip(ref, got):
        den = torch.linalg.vector_norm(r.double()).item()
        if den > 0:
            e = torch.linalg.vector_norm((g.double() - r.double())).item() / den
            worst = max(worst, e if e == e else float("inf"))
    return worst


def evaluate(model, stream: TwoStream, h, states, rngs, segments, tolerance: float):
    """(per-layer input errors, gradient error, floor or None) of a given segmentation; the floor (single-layer
    segments' gradient error) is measured only when the gradient error exceeds the tolerance."""
    layers = model.reversible_indices
    errors = segment_errors(stream, layers, states, rngs, segments)
    grad = gradient_error(model, h, stream.ctx, segments)
    floor = gradient_error(model, h, stream.ctx, uniform_segments(layers, 1)) if grad > tolerance else None
    return errors, grad, floor


def choose_segments(model, stream: TwoStream, h, states, rngs, tolerance: float):
    """Automatic segments: greedy on the input error at tolerance / HEADROOM, tightened while the adapter
    gradients exceed the tolerance (or FLOOR_FACTOR × the precision's floor). Returns what `evaluate` does,
    segments first."""
    layers = model.reversible_indices
    target, floor = tolerance / HEADROOM, None
    for _ in range(MAX_TIGHTEN + 1):
        segments, errors = greedy_segments(stream, layers, states, rngs, target)
        grad = gradient_error(model, h, stream.ctx, segments)
        if grad <= tolerance:
            break
        if all(len(seg) == 1 for seg in segments):
            floor = grad                 # nothing shorter exists: this is the floor
            break
        if floor is None:
            floor = gradient_error(model, h, stream.ctx, uniform_segments(layers, 1))
        if grad <= FLOOR_FACTOR * floor:
            break
        target /= HEADROOM
    return segments, errors, grad, floor

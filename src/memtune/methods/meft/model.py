"""The MEFT model: frozen PLM, per-layer adapters, a two-stream stack (reversible where asked) and read-out.

    h₀ = embed(batch)                       frozen, no graph (plus `frozen_layers` plain PLM layers)
    x¹ = x² = h₀                            B×T×d each, in the stream dtype
    reversible layers, in segments          ReversibleSpan per segment: stores B×T×2d per segment
    upper layers                            the same coupling with ordinary autograd
    h = read-out(x¹, x²) → finish → pool    (classification) or → frozen LM head (causal LM)
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..base import MemtuneModel, check
from .calibrate import (FLOOR_FACTOR, ReconstructionReport, choose_segments, describe_segments, evaluate,
                        exact_states, uniform_segments)
from .coupling import LayerAdapters, TwoStream
from .reversible import Span, reversible_span

logger = logging.getLogger("memtune.meft")


def _fork_rng(x: torch.Tensor):
    return torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [])


class MEFTModel(MemtuneModel):
    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        n_layers = backbone.num_layers
        check(config.frozen_layers < n_layers,
              f"{config.name}.frozen_layers must be below the model's {n_layers} layers, got {config.frozen_layers}")
        self.first_adapted = config.frozen_layers
        n_adapted = n_layers - config.frozen_layers
        n_rev = n_adapted if config.reversible_layers is None else config.reversible_layers
        check(n_rev <= n_adapted, f"{config.name}.reversible_layers must be at most the {n_adapted} adapted layers "
                                  f"({n_layers} layers - frozen_layers {config.frozen_layers}), got {n_rev}")
        # Backbone indices: reversible = the lowest adapted layers, upper = ordinary autograd.
        self.reversible_indices = list(range(self.first_adapted, self.first_adapted + n_rev))
        self.upper_indices = list(range(self.first_adapted + n_rev, n_layers))

        cfg = backbone.config
        act = backbone.activation
        # Adapter dropout = the PLM's hidden dropout (BERT 0.1; ViT/DINOv2 0.0; Llama has none).
        p = config.adapter_dropout if config.adapter_dropout is not None else backbone.hidden_dropout
        eps = (getattr(cfg, "layer_norm_eps", None) or getattr(cfg, "rms_norm_eps", None) or 1e-5) \
            if config.adapter_norm else None
        ref = next(backbone.parameters())
        self.adapters = nn.ModuleList(
            LayerAdapters(config.variant, backbone.hidden_size, config.bottleneck, act, p, config.init_std, eps)
            for _ in range(n_adapted)).to(device=ref.device, dtype=ref.dtype)
        if self.head is not None:
            self.head.to(device=ref.device, dtype=ref.dtype)

        self.readout_mode = config.readout if config.readout != "auto" else (
            "plm" if self.objective == "causal-lm" else "mean")
        # Which stored stream carries the PLM's hidden state (docs/methods/meft.md §3): MEFT2 the first, MEFT1/3 the second.
        self.plm_stream = 0 if config.variant == 2 else 1
        if self.readout_mode == "plm":
            # h = stream_PLM + s·stream_other, s = 0 at init (RevLLaMA's read-out; the paper's OPT read-out is
            # not published).
            self.mix = nn.Parameter(torch.zeros((), device=ref.device, dtype=ref.dtype))

        self.coupling = config.coupling if config.coupling != "auto" else (
            "paper" if backbone.norm_position == "post" else "difference")
        # Reversible segments (lists of backbone indices, bottom first); None until measured on a batch.
        self.segments: list[list[int]] | None = (
            uniform_segments(self.reversible_indices, config.segment_layers) if config.segment_layers else None)
        self.report: ReconstructionReport | None = None
        self.stats = {"boundary_error_max": 0.0, "boundary_error_last": None, "resegmented": 0}
        self._warned = False

    # -- pieces of the forward (public for tests and tools) -------------------------------------------
    def stream_dtype_for(self, compute_dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if self.method_config.float64_streams else compute_dtype

    def two_stream(self, ctx, compute_dtype) -> TwoStream:
        return TwoStream(self, ctx, compute_dtype, self.stream_dtype_for(compute_dtype))

    def embed(self, batch):
        """h₀ (B×T×d) and ctx: embeddings and the `frozen_layers` plain PLM layers, without a graph."""
        with torch.no_grad():
            h, ctx = self.backbone.embed(batch)
            h, _ = self.backbone.forward_intermediates(h, ctx, stop=self.first_adapted)
        return h, ctx

    def run_streams(self, h, ctx):
        """h₀ → final (x¹, x²), each B×T×d in the stream dtype."""
        stream = self.two_stream(ctx, h.dtype)
        s = h.to(stream.stream_dtype)
        x1 = x2 = s
        rev = self.reversible_indices
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in self.adapters.parameters())
        if rev and trains:
            if self.segments is None:
                self._calibrate(stream, s)
            x = torch.cat([s, s], dim=-1)                          # B×T×2d
            for j, seg in enumerate(list(self.segments)):
                span = Span(stream, seg, check_input=j > 0, on_error=self._boundary_monitor(seg))
                x = reversible_span(span, x)
            x1, x2 = x.chunk(2, dim=-1)
        else:
            # Inference (or nothing to train): the same coupling, no recomputation.
            for n in rev:
                x1, x2 = stream.forward_layer(n, x1, x2)
        for n in self.upper_indices:
            x1, x2 = stream.forward_layer(n, x1, x2)
        return x1, x2

    def read_out(self, x1, x2, ctx, dtype):
        """Final streams → features (B×F) for classification, or finished token states (B×T×d) for the LM.

        The paper feeds (x¹ + x²)/2 to BERT's frozen pooler and a dropout; here it goes through the family's
        final norm and `pool` like every memtune method (mean over tokens for BERT-like models, [CLS ‖ mean]
        for ViT, the last real token for Llama), with no dropout before the new head.
        """
        if self.readout_mode == "mean":
            h = (x1 + x2) / 2
        else:
            plm, other = (x2, x1) if self.plm_stream == 1 else (x1, x2)
            h = plm + self.mix.to(plm.dtype) * other
        h = self.backbone.finish(h.to(dtype), ctx)
        return h if self.objective == "causal-lm" else self.backbone.pool(h, ctx)

    def features(self, batch):
        h, ctx = self.embed(batch)
        x1, x2 = self.run_streams(h, ctx)
        return self.read_out(x1, x2, ctx, h.dtype)

    @torch.no_grad()
    def stream_states(self, batch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The stored stream pair entering and leaving every adapted layer (len = adapted layers + 1)."""
        with _fork_rng(next(self.adapters.parameters())):
            h, ctx = self.embed(batch)
            stream = self.two_stream(ctx, h.dtype)
            s = h.to(stream.stream_dtype)
            states, _ = exact_states(stream, self.reversible_indices + self.upper_indices, s, s)
        return states

    # -- error control ----------------------------------------------------------------------------------
    def calibrate(self, batch) -> ReconstructionReport:
        """Measure the span's reconstruction error on `batch` and choose the segments (also done
        automatically on the first training forward when `segment_layers` is None)."""
        with _fork_rng(next(self.adapters.parameters())):  # embedding dropout must not consume the stream
            h, ctx = self.embed(batch)
            return self._calibrate(self.two_stream(ctx, h.dtype), h.to(self.stream_dtype_for(h.dtype)))

    def measure(self, batch, segment_layers: int | None = None) -> ReconstructionReport:
        """Errors of the current segmentation (or of uniform `segment_layers`) on `batch`, choosing nothing."""
        if segment_layers:
            segments = uniform_segments(self.reversible_indices, segment_layers)
        elif self.segments is not None:
            segments = self.segments
        else:
            raise ValueError("no segments chosen yet: call calibrate(batch) or pass segment_layers")
        with _fork_rng(next(self.adapters.parameters())):
            h, ctx = self.embed(batch)
            stream = self.two_stream(ctx, h.dtype)
            states, rngs = exact_states(stream, self.reversible_indices, *(2 * [h.to(stream.stream_dtype)]))
            found = evaluate(self, stream, h, states, rngs, segments, self.method_config.tolerance)
        return self._report(stream, h, segments, *found, automatic=False)

    def _calibrate(self, stream: TwoStream, s: torch.Tensor) -> ReconstructionReport:
        """Choose the segments on this batch (s: the span input in the stream dtype), report and log them."""
        cfg = self.method_config
        h = s.to(stream.compute_dtype)
        with _fork_rng(s):                      # the training run's random stream is left untouched
            states, rngs = exact_states(stream, self.reversible_indices, s, s)
            if cfg.segment_layers is None:
                segments, *found = choose_segments(self, stream, h, states, rngs, cfg.tolerance)
            else:
                segments = uniform_segments(self.reversible_indices, cfg.segment_layers)
                found = evaluate(self, stream, h, states, rngs, segments, cfg.tolerance)
        del states
        self.segments = segments
        self.report = self._report(stream, h, segments, *found, automatic=cfg.segment_layers is None)
        logger.info("memtune: %s", self.describe())
        if not self.report.ok:
            logger.warning("memtune: %s: %s; try float64_streams=true, larger lam/beta, or fewer reversible_layers",
                           cfg.name, self.report)
        return self.report

    def _report(self, stream, h, segments, errors, grad, floor, automatic) -> ReconstructionReport:
        return ReconstructionReport(self.reversible_indices, segments, errors, self.method_config.tolerance,
                                    str(stream.stream_dtype).replace("torch.", ""), tuple(h.shape[:2]),
                                    automatic=automatic, gradient_error=grad, gradient_floor=floor)

    def _boundary_monitor(self, seg: list[int]):
        """Called by a non-first segment's backward with the measured error of its recomputed input."""
        def on_error(err: float) -> None:
            cfg = self.method_config
            self.stats["boundary_error_last"] = err
            self.stats["boundary_error_max"] = max(self.stats["boundary_error_max"], err)
            if err <= cfg.tolerance:
                return
            if cfg.segment_layers is None and len(seg) > 1 and self.segments and seg in self.segments:
                # The adapters moved the span away from its calibrated conditioning: halve this segment.
                i = self.segments.index(seg)
                half = len(seg) // 2
                self.segments[i:i + 1] = [seg[:half], seg[half:]]
                self.stats["resegmented"] += 1
                logger.warning("memtune: %s: reconstruction error %.2e at the bottom of segment %d-%d exceeds "
                               "tolerance %g; segment split in two", cfg.name, err, seg[0], seg[-1], cfg.tolerance)
            elif not self._warned:
                self._warned = True
                logger.warning("memtune: %s: reconstruction error %.2e at a segment boundary exceeds tolerance %g",
                               cfg.name, err, cfg.tolerance)
        return on_error

    # -- reporting ---------------------------------------------------------------------------------------
    def describe(self) -> str:
        cfg = self.method_config
        lam, beta = cfg.factors
        bb = self.backbone
        parts = [f"MEFT{cfg.variant} (Liao et al., 2023) on a {bb.family} model with {bb.num_layers} layers, "
                 f"d={bb.hidden_size}, b={cfg.bottleneck}: λ={lam:g}, β={beta:g}, "
                 f"{'streams swapped' if cfg.swap else 'no swap'}"]

        def span(idx):
            return f"{idx[0]}-{idx[-1]}" if len(idx) > 1 else str(idx[0])

        if self.first_adapted:
            parts.append(f"layers {span(list(range(self.first_adapted)))} plain PLM without graph")
        rev = self.reversible_indices
        if rev:
            if self.segments is None:
                seg = f"segments chosen on the first training batch (tolerance {cfg.tolerance:g})"
            else:
                how = "automatic" if cfg.segment_layers is None else f"fixed, {cfg.segment_layers} layers each"
                seg = f"{describe_segments(self.segments)} ({how})"
                if self.report is not None:
                    r = self.report
                    limit = f"tolerance {cfg.tolerance:g}" if r.gradient_limit <= cfg.tolerance else (
                        f"limits {cfg.tolerance:g} (inputs) and {r.gradient_limit:.1e} (gradients: "
                        f"{FLOOR_FACTOR:g}× this precision's single-layer floor {r.gradient_floor:.1e})")
                    seg += (f", measured max reconstruction error {r.max_error:.1e} and adapter gradient error "
                            f"{r.gradient_error:.1e} {'within' if r.ok else 'ABOVE'} {limit}")
            parts.append(f"layers {span(rev)} reversible in {seg}")
        if self.upper_indices:
            parts.append(f"layers {span(self.upper_indices)} two-stream with ordinary autograd")
        parts.append(f"{'float64' if cfg.float64_streams else 'model-dtype'} streams, {self.coupling} coupling, "
                     f"read-out {self.readout_mode}")
        trainable, total = self.num_parameters_split()
        parts.append(f"trainable {trainable:,} of {total:,} parameters")
        return "; ".join(parts)

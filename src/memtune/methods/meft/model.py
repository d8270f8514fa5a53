"""The MEFT model: frozen PLM, per-layer adapters, a two-stream stack (reversible where asked) and read-out.

    h₀ = embed(batch)                       frozen, no graph (plus `frozen_layers` plain PLM layers)
    x¹ = x² = h₀                            B×T×d each, in the stream dtype
    reversible layers, in segments          ReversibleSpan per segment: stores B×T×2d per segment
    upper layers                            the same coupling with ordinary autograd
    h = read-out(x¹, x²) → finish → pool    (classification) or → frozen LM head (causal LM)

Encoder-decoders (T5): the encoder stack as above, then memory = finish_encoder(read-out(x¹, x²)) (B×Ts×d,
on the graph of the encoder's adapters); the decoder is a second two-stream stack starting from its own
embedding (y¹ = y² = d₀, B×Tt×d) whose F/G contain its self-attention, cross-attention to the memory and FFN
(coupling.StackCalls); its reversible spans take the memory as an input and return ∂L/∂memory, which flows
into the encoder's spans. Read-out: decoder streams → finish_decoder → pool (the start position), or the
finished decoder states for the text-to-text objective.
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


class StackView:
    """One two-stream stack of a MEFT model as the span code and the calibration see it: the (encoder or
    single) stack, or an encoder-decoder's decoder. Its layer lists, segments and report are the model's
    attributes of that stack (`reversible_indices`, ... or `decoder_reversible_indices`, ...)."""

    def __init__(self, model: "MEFTModel", decoder: bool = False):
        self.model, self.decoder = model, decoder
        self.method_config = model.method_config
        self.name = "decoder" if decoder else "encoder" if model.backbone.is_encoder_decoder else "stack"
        self._prefix = "decoder_" if decoder else ""

    def _get(self, attr):
        return getattr(self.model, self._prefix + attr)

    reversible_indices = property(lambda self: self._get("reversible_indices"))
    upper_indices = property(lambda self: self._get("upper_indices"))
    segments = property(lambda self: self._get("segments"),
                        lambda self, v: setattr(self.model, self._prefix + "segments", v))
    report = property(lambda self: self._get("report"),
                      lambda self, v: setattr(self.model, self._prefix + "report", v))

    def two_stream(self, ctx, compute_dtype) -> TwoStream:
        return self.model.two_stream(ctx, compute_dtype, decoder=self.decoder)


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
        # Encoder-decoders: the decoder stack, every layer adapted (frozen_layers is the encoder's; a decoder
        # layer reads the memory, which carries the encoder adapters' gradient, so none can run graph-free).
        self.encoder_decoder = backbone.is_encoder_decoder
        n_dec = len(backbone.decoder_blocks) if self.encoder_decoder else 0
        n_rev_dec = n_dec if config.reversible_layers is None else config.reversible_layers
        check(not self.encoder_decoder or n_rev_dec <= n_dec,
              f"{config.name}.reversible_layers counts per stack and must be at most the decoder's {n_dec} "
              f"layers too, got {n_rev_dec}")
        self.decoder_reversible_indices = list(range(n_rev_dec)) if self.encoder_decoder else []
        self.decoder_upper_indices = list(range(n_rev_dec, n_dec))

        cfg = backbone.config
        act = backbone.activation
        # Adapter dropout = the PLM's hidden dropout (BERT 0.1; ViT/DINOv2 0.0; Llama has none).
        p = config.adapter_dropout if config.adapter_dropout is not None else backbone.hidden_dropout
        eps = (getattr(cfg, "layer_norm_eps", None) or getattr(cfg, "rms_norm_eps", None) or 1e-5) \
            if config.adapter_norm else None
        ref = next(backbone.parameters())

        def adapters(count: int) -> nn.ModuleList:
            return nn.ModuleList(
                LayerAdapters(config.variant, backbone.hidden_size, config.bottleneck, act, p, config.init_std, eps)
                for _ in range(count)).to(device=ref.device, dtype=ref.dtype)

        self.adapters = adapters(n_adapted)
        self.decoder_adapters = adapters(n_dec) if self.encoder_decoder else None
        if self.head is not None:
            # The official code's head is transformers' classifier: N(0, initializer_range²) weights, zero bias.
            nn.init.normal_(self.head.weight, std=getattr(cfg, "initializer_range", 0.02))
            nn.init.zeros_(self.head.bias)
            self.head.to(device=ref.device, dtype=ref.dtype)

        # auto: the frozen LM head of a causal LM or text-to-text model needs the PLM's hidden state.
        self.readout_mode = config.readout if config.readout != "auto" else ("plm" if self.per_token else "mean")
        # Which stored stream carries the PLM's hidden state (docs/methods/meft.md §3): MEFT2 the first, MEFT1/3 the second.
        self.plm_stream = 0 if config.variant == 2 else 1
        if self.readout_mode == "plm":
            # h = stream_PLM + s·stream_other, s = 0 at init (RevLLaMA's read-out; the paper's OPT read-out is
            # not published).
            self.mix = nn.Parameter(torch.zeros((), device=ref.device, dtype=ref.dtype))
            if self.encoder_decoder:        # the same rule for the encoder streams that make the memory
                self.memory_mix = nn.Parameter(torch.zeros((), device=ref.device, dtype=ref.dtype))

        self.coupling = config.coupling if config.coupling != "auto" else (
            "paper" if backbone.norm_position == "post" else "difference")
        # Reversible segments (lists of backbone indices, bottom first); None until measured on a batch.
        self.segments: list[list[int]] | None = (
            uniform_segments(self.reversible_indices, config.segment_layers) if config.segment_layers else None)
        self.report: ReconstructionReport | None = None
        # The decoder's, chosen and measured on its own (segments restart from stored states per stack).
        self.decoder_segments: list[list[int]] | None = (
            uniform_segments(self.decoder_reversible_indices, config.segment_layers) if config.segment_layers
            else None)
        self.decoder_report: ReconstructionReport | None = None
        self.stats = {"boundary_error_max": 0.0, "boundary_error_last": None, "resegmented": 0}
        self._warned = False

    # -- pieces of the forward (public for tests and tools) -------------------------------------------
    def stream_dtype_for(self, compute_dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if self.method_config.float64_streams else compute_dtype

    def two_stream(self, ctx, compute_dtype, decoder: bool = False) -> TwoStream:
        return TwoStream(self, ctx, compute_dtype, self.stream_dtype_for(compute_dtype), decoder=decoder)

    def stack(self, decoder: bool = False) -> StackView:
        return StackView(self, decoder)

    def graph_free_blocks(self) -> list[nn.Module]:
        """Blocks run without an autograd graph in the forward (docs/methods/meft.md §11.4): the frozen lower
        layers and the reversible ones of each stack (recomputed in backward)."""
        bb = self.backbone
        blocks = [bb.blocks[i] for i in range(self.first_adapted)] + [bb.blocks[i] for i in self.reversible_indices]
        if self.encoder_decoder:
            blocks += [bb.decoder_blocks[i] for i in self.decoder_reversible_indices]
        return blocks

    def embed(self, batch):
        """h₀ (B×T×d) and ctx: embeddings and the `frozen_layers` plain PLM layers, without a graph."""
        with torch.no_grad():
            h, ctx = self.backbone.embed(batch)
            h, _ = self.backbone.forward_intermediates(h, ctx, stop=self.first_adapted)
        return h, ctx

    def decoder_embed(self, batch, memory, ctx):
        """d₀ (B×Tt×d) and the decoder's ctx reading `memory` (B×Ts×d, with its graph), without a graph in the
        frozen embedding; ctx["encoder_ctx"] keeps the encoder's ctx for `pool`."""
        with torch.no_grad():
            d, dctx = self.backbone.decoder_embed(batch, memory, ctx["token_mask"])
        dctx["memory"], dctx["encoder_ctx"] = memory, ctx
        return d, dctx

    def memory_of(self, x1, x2, ctx, dtype):
        """Final encoder streams → memory B×Ts×d: the read-out rule (mean, or PLM stream + s'·other with its
        own scalar s'), then the frozen final norm and dropout (`finish_encoder`)."""
        return self.backbone.finish_encoder(self._combine(x1, x2, "memory_mix").to(dtype))

    @torch.no_grad()
    def decoder_inputs(self, batch):
        """(d₀, decoder ctx) of `batch` with the memory of the current adapters (no graph: for measurements)."""
        h, ctx = self.embed(batch)
        x1, x2 = self.run_streams(h, ctx)
        return self.decoder_embed(batch, self.memory_of(x1, x2, ctx, h.dtype), ctx)

    def run_streams(self, h, ctx, decoder: bool = False):
        """h₀ → final (x¹, x²) of one stack, each B×T×d in the stream dtype (decoder: ctx of decoder_embed)."""
        view = self.stack(decoder)
        stream = self.two_stream(ctx, h.dtype, decoder)
        s = h.to(stream.stream_dtype)
        x1 = x2 = s
        rev = view.reversible_indices
        trains = torch.is_grad_enabled() and any(p.requires_grad for p in stream.adapters.parameters())
        if rev and trains:
            if view.segments is None:
                self._calibrate(view, stream, s)
            x = torch.cat([s, s], dim=-1)                          # B×T×2d
            for j, seg in enumerate(list(view.segments)):
                span = Span(stream, seg, check_input=j > 0, on_error=self._boundary_monitor(view, seg))
                x = reversible_span(span, x)
            x1, x2 = x.chunk(2, dim=-1)
        else:
            # Inference (or nothing to train): the same coupling, no recomputation.
            for n in rev:
                x1, x2 = stream.forward_layer(n, x1, x2)
        for n in view.upper_indices:
            x1, x2 = stream.forward_layer(n, x1, x2)
        return x1, x2

    def _combine(self, x1, x2, mix: str = "mix"):
        """The read-out rule on two streams: (x¹ + x²)/2, or stream_PLM + s·stream_other (s: `mix`)."""
        if self.readout_mode == "mean":
            return (x1 + x2) / 2
        plm, other = (x2, x1) if self.plm_stream == 1 else (x1, x2)
        return plm + getattr(self, mix).to(plm.dtype) * other

    def read_out(self, x1, x2, ctx, dtype):
        """Final streams → features (B×F) for classification, or finished token states (B×T×d) for the LM.

        The paper feeds (x¹ + x²)/2 to BERT's frozen pooler and a dropout; here it goes through the family's
        final norm and `pool` like every memtune method (mean over tokens for BERT-like models, [CLS ‖ mean]
        for ViT, the last real token for Llama), with no dropout before the new head. Encoder-decoders: the
        decoder's final streams (ctx: the decoder's) through `finish_decoder`, pooled at the start position.
        """
        h = self._combine(x1, x2).to(dtype)
        if self.encoder_decoder:
            h = self.backbone.finish_decoder(h)
            ctx = ctx.get("encoder_ctx", ctx)
        else:
            h = self.backbone.finish(h, ctx)
        return h if self.per_token else self.backbone.pool(h, ctx)

    def features(self, batch):
        h, ctx = self.embed(batch)
        x1, x2 = self.run_streams(h, ctx)
        if not self.encoder_decoder:
            return self.read_out(x1, x2, ctx, h.dtype)
        d, dctx = self.decoder_embed(batch, self.memory_of(x1, x2, ctx, h.dtype), ctx)
        y1, y2 = self.run_streams(d, dctx, decoder=True)
        return self.read_out(y1, y2, dctx, d.dtype)

    def _stack_input(self, batch, decoder: bool):
        """(stack input B×T×d, its ctx): the encoder's embedding output, or the decoder's (with the memory)."""
        return self.decoder_inputs(batch) if decoder else self.embed(batch)

    @torch.no_grad()
    def stream_states(self, batch, decoder: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The stored stream pair entering and leaving every adapted layer of a stack (len = its adapted
        layers + 1)."""
        view = self.stack(decoder)
        with _fork_rng(next(self.adapters.parameters())):
            h, ctx = self._stack_input(batch, decoder)
            stream = self.two_stream(ctx, h.dtype, decoder)
            s = h.to(stream.stream_dtype)
            states, _ = exact_states(stream, view.reversible_indices + view.upper_indices, s, s)
        return states

    # -- error control ----------------------------------------------------------------------------------
    def calibrate(self, batch) -> ReconstructionReport:
        """Measure the span's reconstruction error on `batch` and choose the segments (also done
        automatically on the first training forward when `segment_layers` is None). Encoder-decoders: both
        stacks are calibrated; the encoder's report is returned, the decoder's is `decoder_report`."""
        with _fork_rng(next(self.adapters.parameters())):  # embedding dropout must not consume the stream
            h, ctx = self.embed(batch)
            report = self._calibrate(self.stack(), self.two_stream(ctx, h.dtype), h.to(self.stream_dtype_for(h.dtype)))
            if self.encoder_decoder and self.decoder_reversible_indices:
                d, dctx = self.decoder_inputs(batch)
                self._calibrate(self.stack(True), self.two_stream(dctx, d.dtype, True),
                                d.to(self.stream_dtype_for(d.dtype)))
        return report

    def measure(self, batch, segment_layers: int | None = None, decoder: bool = False) -> ReconstructionReport:
        """Errors of a stack's current segmentation (or of uniform `segment_layers`) on `batch`, choosing
        nothing."""
        view = self.stack(decoder)
        if segment_layers:
            segments = uniform_segments(view.reversible_indices, segment_layers)
        elif view.segments is not None:
            segments = view.segments
        else:
            raise ValueError("no segments chosen yet: call calibrate(batch) or pass segment_layers")
        with _fork_rng(next(self.adapters.parameters())):
            h, ctx = self._stack_input(batch, decoder)
            stream = self.two_stream(ctx, h.dtype, decoder)
            states, rngs = exact_states(stream, view.reversible_indices, *(2 * [h.to(stream.stream_dtype)]))
            found = evaluate(view, stream, h, states, rngs, segments, self.method_config.tolerance)
        return self._report(view, stream, h, segments, *found, automatic=False)

    def _calibrate(self, view: StackView, stream: TwoStream, s: torch.Tensor) -> ReconstructionReport:
        """Choose a stack's segments on this batch (s: the span input in the stream dtype), report, log."""
        cfg = self.method_config
        h = s.to(stream.compute_dtype)
        layers = view.reversible_indices
        with _fork_rng(s):                      # the training run's random stream is left untouched
            states, rngs = exact_states(stream, layers, s, s)
            if cfg.segment_layers is None:
                segments, *found = choose_segments(view, stream, h, states, rngs, cfg.tolerance)
            else:
                segments = uniform_segments(layers, cfg.segment_layers)
                found = evaluate(view, stream, h, states, rngs, segments, cfg.tolerance)
        del states
        view.segments = segments
        view.report = report = self._report(view, stream, h, segments, *found, automatic=cfg.segment_layers is None)
        logger.info("memtune: %s", self.describe())
        if not report.ok:
            logger.warning("memtune: %s (%s): %s; try float64_streams=true, larger lam/beta, or fewer "
                           "reversible_layers", cfg.name, view.name, report)
        return report

    def _report(self, view, stream, h, segments, errors, grad, floor, automatic) -> ReconstructionReport:
        return ReconstructionReport(view.reversible_indices, segments, errors, self.method_config.tolerance,
                                    str(stream.stream_dtype).replace("torch.", ""), tuple(h.shape[:2]),
                                    automatic=automatic, gradient_error=grad, gradient_floor=floor)

    def _boundary_monitor(self, view: StackView, seg: list[int]):
        """Called by a non-first segment's backward with the measured error of its recomputed input."""
        def on_error(err: float) -> None:
            cfg = self.method_config
            self.stats["boundary_error_last"] = err
            self.stats["boundary_error_max"] = max(self.stats["boundary_error_max"], err)
            if err <= cfg.tolerance:
                return
            segments = view.segments
            if cfg.segment_layers is None and len(seg) > 1 and segments and seg in segments:
                # The adapters moved the span away from its calibrated conditioning: halve this segment.
                i = segments.index(seg)
                half = len(seg) // 2
                segments[i:i + 1] = [seg[:half], seg[half:]]
                self.stats["resegmented"] += 1
                logger.warning("memtune: %s: reconstruction error %.2e at the bottom of %s segment %d-%d exceeds "
                               "tolerance %g; segment split in two", cfg.name, err, view.name, seg[0], seg[-1],
                               cfg.tolerance)
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
        depth = (f"{bb.num_layers} encoder and {len(bb.decoder_blocks)} decoder layers" if self.encoder_decoder
                 else f"{bb.num_layers} layers")
        parts = [f"MEFT{cfg.variant} (Liao et al., 2023) on a {bb.family} model with {depth}, "
                 f"d={bb.hidden_size}, b={cfg.bottleneck}: λ={lam:g}, β={beta:g}, "
                 f"{'streams swapped' if cfg.swap else 'no swap'}"]
        prefix = "encoder " if self.encoder_decoder else ""

        def span(idx):
            return f"{idx[0]}-{idx[-1]}" if len(idx) > 1 else str(idx[0])

        if self.first_adapted:
            parts.append(f"{prefix}layers {span(list(range(self.first_adapted)))} plain PLM without graph")
        for view in [self.stack()] + ([self.stack(True)] if self.encoder_decoder else []):
            parts += self._describe_stack(view, span)
        parts.append(f"{'float64' if cfg.float64_streams else 'model-dtype'} streams, {self.coupling} coupling, "
                     f"read-out {self.readout_mode}")
        trainable, total = self.num_parameters_split()
        parts.append(f"trainable {trainable:,} of {total:,} parameters")
        return "; ".join(parts)

    def _describe_stack(self, view: StackView, span) -> list[str]:
        cfg = self.method_config
        prefix = "" if view.name == "stack" else f"{view.name} "
        parts, rev = [], view.reversible_indices
        if rev:
            if view.segments is None:
                seg = f"segments chosen on the first training batch (tolerance {cfg.tolerance:g})"
            else:
                how = "automatic" if cfg.segment_layers is None else f"fixed, {cfg.segment_layers} layers each"
                seg = f"{describe_segments(view.segments)} ({how})"
                if view.report is not None:
                    r = view.report
                    limit = f"tolerance {cfg.tolerance:g}" if r.gradient_limit <= cfg.tolerance else (
                        f"limits {cfg.tolerance:g} (inputs) and {r.gradient_limit:.1e} (gradients: "
                        f"{FLOOR_FACTOR:g}× this precision's single-layer floor {r.gradient_floor:.1e})")
                    seg += (f", measured max reconstruction error {r.max_error:.1e} and adapter gradient error "
                            f"{r.gradient_error:.1e} {'within' if r.ok else 'ABOVE'} {limit}")
            parts.append(f"{prefix}layers {span(rev)} reversible in {seg}")
        if view.upper_indices:
            parts.append(f"{prefix}layers {span(view.upper_indices)} two-stream with ordinary autograd")
        return parts

"""SHERL: a frozen early route without a graph, a light aggregator, and the last pretrained layer(s).

    early route (torch.no_grad):  F_0 = embed(x),  F_l = φ_l(F_{l-1}),  l = 1..N-L     each B×K×D
    MTSA (trainable):             X̃ = U(ReLU(g)) + tanh(γ/τ)·F_{N-L}                 B×K×D   (mtsa.py)
    late route (frozen weights,   Y = φ_N(...φ_{N-L+1}(X̃)) → the backbone's final norm → pool → head
    gradient flows through it)

Only the collected features F_l (saved by the trainable projections P_l), the MTSA's activations and
the L late blocks' activations are kept for backward (Diao et al., "SHERL", ECCV 2024).

Choices where the description leaves room (each is tested in tests/methods/test_sherl.py):
- Recipe: side width d = hidden_size // r, the projections P_l, the restore U, the init of the MTSA's maps
  and the collected layers come from the released fork of the backbone's kind (config.RECIPES: the T5 fork
  on encoder–decoders, d = D/4, gated P_l; CLIP-ViL on vision encoders, d = D/2, gated P_l, N(0, 0.02²);
  VSE∞'s BERT text tower on text encoders and decoders, d = D/2, Linear → LN P_l and U, PyTorch's init);
  each is an option that overrides it. Which r the paper's tables used is unknown.
- Which early outputs are collected: all of them (embedding + every early block) except that
  `drop_every=k` skips the outputs of 0-indexed blocks i with i % k == 0. The released T5 config does
  this with k = 4 (encoder: embedding + {1,2,3,5,6,7,9,10,11}; decoder: embedding + {1,2,3,5,6,7,9,10});
  the other forks collect every output (k = 0). The guide F_{N-L} is
  always kept.
- `late_layers=L > 1` is a library extension (the paper always uses one late layer): the MTSA feeds
  the first of the last L blocks, which all run frozen with gradient flowing through them.
- Single-stack backbones (BERT / ViT / Llama): after the late route come the backbone's own frozen final
  norm (`final_norm`; none for post-LN BERT), pooling and the trainable head; for a causal LM the frozen
  LM head.
- Encoder–decoders (T5, the released wiring): the encoder has no late route. All encoder blocks run
  without a graph; the encoder MTSA (its guide: the last encoder block) → a new side norm (the class of
  the encoder's final norm, weight ones) → encoder dropout becomes the memory of the decoder's late
  block(s) only; earlier decoder blocks attend to the original encoder output. The decoder MTSA feeds the
  last L decoder blocks, followed by a second new side norm (the decoder final norm's class, ones) in place
  of the pretrained decoder final norm. memtune's T5 is used for classification (start-position state →
  head), so the released code's tied LM head × D^-1/2 does not apply. Trainable count (gated P, n features
  per MTSA): Σ_MTSA [n·(D·d + d + 2(d² + d)) + (d + 1) + (d·D + D) + 1] + 2·D.
- Hierarchical backbones (several stages, `backbone.stage_starts`; Swin), in the form of the released VSE∞
  ResNeXt fork (stages.py): the collected outputs are the blocks' in-stage outputs (before a patch merging),
  each max+avg pooled to the guide's grid and, where its width differs, projected to the guide's width D_g
  by a trainable Linear → LayerNorm; the MTSA then runs at D_g (d = D_g // r). The late blocks must lie in
  one stage (a ConfigError otherwise); when the guide's block ends a stage, its frozen transition runs on X̃,
  on the gradient path, before the late blocks. Then the backbone's final norm and pooling, as above. The
  trunk cache is refused there (its rows hold features of one shape, and these differ in width per stage).
- Image-text compositions (capability "visual_side_tokens"; visual.py, docs/methods/vl.md §4 mode B): the text
  backbone reads a frozen, RMS-matched visual prefix, F_0 = [P_b(v) ; text embedding] over V+T positions, the
  MTSA reads all of them, and a trainable P_s(v), 0 at init, is added at the visual positions of X̃ (T5: of the
  encoder MTSA's output, the late decoder blocks' memory); gradient still enters only the late block(s).
"""
from __future__ import annotations

import torch
from torch import nn

from ...backbones import families_with
from ..base import ConfigError, MemtuneModel, check
from ..common.trunk_cache import cached_trunk, check_trunk_deterministic, trunk_eval_mode
from .mtsa import MTSA, init_linears
from .stages import StageProjection, early_route_in_stages, pool_to_grid
from .visual import checksum_view, visual_side_projection


def collected_blocks(num_early: int, drop_every: int) -> list[int]:
    """0-indexed early blocks whose outputs are collected (the embedding output is always collected).

    drop_every=k > 0 skips blocks i with i % k == 0; the last early block (the guide) is always kept.
    """
    return [i for i in range(num_early) if drop_every <= 0 or i % drop_every != 0 or i == num_early - 1]


class SHERLModel(MemtuneModel):
    visual_path = True           # SHERL-VL: a frozen visual prefix and P_s at the visual positions of X̃ (visual.py)

    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        self.side_visual = visual_side_projection(backbone)  # P_s; None unless an image-text composition
        encoder_decoder = backbone.is_encoder_decoder
        depth = len(backbone.output_blocks)
        check(config.late_layers < depth,
              f"sherl.late_layers={config.late_layers} leaves no early layer in this {depth}-layer "
              f"{'decoder' if encoder_decoder else 'stack'}; allowed: 1..{depth - 1}")
        self.num_early = depth - config.late_layers          # blocks of the output stack run without a graph
        self.hierarchical = len(backbone.stage_starts) > 1    # stages of their own width and grid (Swin)
        if self.hierarchical:
            self._check_late_stage(backbone, config.late_layers, depth)
        # The MTSA's width: the guide's (the last early block's; the one width D elsewhere).
        D = backbone.block_widths[self.num_early - 1] if self.hierarchical else backbone.hidden_size
        recipe = config.resolved(backbone)                    # r, projection, restore, init, drop_every
        d = D // recipe["r"]
        check(d >= 1, f"sherl.r={recipe['r']} leaves a side width of 0 for hidden size {D}; allowed: 1..{D}")
        drop_every = recipe["drop_every"]
        self.side_width = d

        def mtsa(n):
            return MTSA(n, D, d, recipe["projection"], recipe["restore"], config.gate_init, config.temperature,
                        config.tap_storage, recipe["init"])

        self.taps = collected_blocks(self.num_early, drop_every)
        self.mtsa = mtsa(1 + len(self.taps))
        if encoder_decoder:
            self.encoder_taps = collected_blocks(backbone.num_layers, drop_every)
            self.encoder_mtsa = mtsa(1 + len(self.encoder_taps))
            # New norms of the family's kind at width D (weight = ones): the encoder MTSA's, and the one that
            # replaces the decoder's final norm.
            self.encoder_side_norm = backbone.side_norm(D, backbone.stack_config())
            self.side_norm = backbone.side_norm(D, backbone.stack_config(decoder=True))
        if self.hierarchical:
            self._build_stage_projections(backbone, D, recipe["init"], config.tap_storage)
        if config.cache_trunk:
            check(not self.hierarchical,
                  f"sherl.cache_trunk is not supported on {backbone.family} backbones: their collected features "
                  "differ in width per stage, and a trunk-cache row holds features of one shape; "
                  "use cache_trunk=false")
            *others, last = families_with(("single_stack",))
            check(not encoder_decoder, f"sherl.cache_trunk is supported for {', '.join(others)} and {last} backbones, "
                                       f"not {backbone.family}")
            check_trunk_deterministic("sherl", [backbone], config.trunk_dropout)
        self.trunk_cache = config.make_trunk_cache()

    @staticmethod
    def _check_late_stage(backbone, late_layers: int, depth: int) -> None:
        """The late blocks must share one stage: X̃ has one width and grid, and the MTSA cannot feed a route
        that changes both halfway."""
        last_stage = backbone.stage_of(depth - 1)
        in_last = depth - backbone.stage_starts[last_stage]
        if backbone.stage_of(depth - late_layers) != last_stage:
            first = depth - late_layers
            raise ConfigError(
                f"sherl.late_layers={late_layers} would make the late route (blocks {first}..{depth - 1}) span a "
                f"stage transition of this {backbone.family} backbone (stages start at blocks "
                f"{', '.join(map(str, backbone.stage_starts))}); allowed: 1..{in_last}, the blocks of its last stage")

    def _build_stage_projections(self, backbone, D: int, init: str, tap_storage: str) -> None:
        """One Linear → LayerNorm (d_s → D) per collected feature whose width d_s is not the guide's D
        (stages.py)."""
        widths = backbone.block_widths
        # The collected features in MTSA order: the embedding (stage 0's width), then the tapped blocks.
        self.feature_names = ["embed"] + [f"block{i}" for i in self.taps]
        feature_widths = [widths[0]] + [widths[i] for i in self.taps]
        self.guide_stage = backbone.stage_of(self.num_early - 1)
        self.stage_proj = nn.ModuleDict({name: StageProjection(w, D, tap_storage)
                                         for name, w in zip(self.feature_names, feature_widths) if w != D})
        init_linears(self.stage_proj, init)

    @property
    def late_blocks(self) -> list[nn.Module]:
        return list(self.backbone.output_blocks[self.num_early:])

    @property
    def early_blocks(self) -> list[nn.Module]:
        """Blocks that run without an autograd graph (encoder–decoders: the whole encoder and the early decoder)."""
        bb = self.backbone
        encoder = list(bb.blocks) if bb.is_encoder_decoder else []
        return encoder + list(bb.output_blocks[:self.num_early])

    def features(self, batch):
        bb = self.backbone
        if bb.is_encoder_decoder:
            return self._encoder_decoder_features(batch)
        if self.hierarchical:
            return self._stage_features(batch)
        with torch.no_grad(), trunk_eval_mode(bb, not self.method_config.trunk_dropout):
            h, ctx = bb.embed(batch)
            mask = ctx.get("token_mask")
            cache = self.trunk_cache if self.training else None
            # With the cache (which stores real rows only) padded rows of the features are zero; real rows
            # are the same either way, since real tokens never attend to padded keys.
            real = (None if cache is None or mask is None or bool(mask.all())
                    else mask.to(h.dtype).unsqueeze(-1))       # B×K×1

            def compute():                                     # the collected early outputs, B×K×D each
                return bb.forward_intermediates(h, ctx, self.taps, stop=self.num_early, row_mask=real)[1]

            keys = batch if self.side_visual is None else checksum_view(batch, ctx["visual_prefix_length"],
                                                                        bb.input_keys)
            feats = cached_trunk(cache, keys, mask, bb.input_keys, compute, h)
            feats = [h if real is None else h * real] + feats
        x = self.mtsa(feats)                                   # X̃: B×K×D, the only graph so far
        if self.side_visual is not None:                       # K = V+T: X̃ + [P_s(v) ; 0]
            x = self.side_visual.add_at_visual_positions(x, ctx)
        return self._late_route(x, ctx)

    def _stage_features(self, batch):
        """Hierarchical backbones: in-stage outputs pooled (no graph) and projected to the guide's grid and width."""
        bb = self.backbone
        with torch.no_grad(), trunk_eval_mode(bb, not self.method_config.trunk_dropout):
            h, ctx = bb.embed(batch)                           # B×T_0×d_0
            outs = [(0, h)] + early_route_in_stages(bb, h, ctx, self.taps, self.num_early)
            target = bb.stage_grid(self.guide_stage, ctx)     # the guide's (rows, cols)
            pooled = [pool_to_grid(f, bb.stage_grid(s, ctx), target) for s, f in outs]   # B×T_g×d_s each
        feats = [self.stage_proj[name](f) if name in self.stage_proj else f        # B×T_g×D each
                 for name, f in zip(self.feature_names, pooled)]
        x = self.mtsa(feats)                                   # X̃: B×T_g×D, the only graph so far
        x = bb.stage_transition(self.num_early - 1, x, ctx)    # frozen; the identity unless the guide ends a stage
        return self._late_route(x, ctx)

    def _late_route(self, x, ctx):
        """The merged features X̃ through the late block(s), the final norm and (unless per-token) the pooling."""
        bb = self.backbone
        for i in range(self.num_early, bb.num_layers):
            x = bb.run_block(i, x, ctx)                        # frozen weights, gradient flows through
        h = bb.finish(x, ctx)
        return h if self.per_token else bb.pool(h, ctx)

    def _encoder_decoder_features(self, batch):
        bb = self.backbone
        with torch.no_grad(), trunk_eval_mode(bb, not self.method_config.trunk_dropout):
            h, ctx = bb.embed(batch)
            last, enc_feats = bb.forward_intermediates(h, ctx, self.encoder_taps, stop=bb.num_layers)
            memory = bb.finish_encoder(last)                   # B×Ts×D, read by the early decoder blocks
            y, dctx = bb.decoder_embed(batch, memory, ctx["token_mask"])
            _, dec_feats = bb.forward_intermediates(y, dctx, self.taps, stop=self.num_early, decoder=True)
        # The encoder MTSA output is the memory of the late decoder block(s) only: B×Ts×D.
        side_memory = self.encoder_mtsa([h] + enc_feats)      # B×Ts×D (Ts = V+T on a composition)
        if self.side_visual is not None:
            side_memory = self.side_visual.add_at_visual_positions(side_memory, ctx)
        dctx["memory"] = bb.finish_encoder(side_memory, norm=self.encoder_side_norm)
        x = self.mtsa([y] + dec_feats)                         # B×Tt×D
        for i in range(self.num_early, len(bb.decoder_blocks)):
            x = bb.run_decoder_block(i, x, dctx)
        h = bb.finish_decoder(x, norm=self.side_norm)                     # B×Tt×D
        return h if self.per_token else bb.pool(h, ctx)

"""Swin Transformer encoders (transformers' `SwinModel`): a hierarchical image encoder.

Stages of pre-norm window-attention blocks; within a stage every second block shifts its windows by half a
window (with the attention mask that keeps shifted windows apart), and between stages a frozen patch merging
joins each 2×2 patch neighbourhood: tokens /4, width ×2. The stack ends with a LayerNorm and mean pooling
over all tokens (HF's pooler); there is no [CLS] token.

The blocks (HF `SwinLayer`s) are one flat list in stage order, and the width changes per stage, so the
backbone states its stages (`stage_starts`, `block_widths`, base.py), declares the "stages" capability (SHERL
then pools and projects each stage's outputs to its guide's grid and width) and sets `one_width = False`: MEFT
(reversible couplings of width d) is refused through "sublayers", which Swin does not declare.

LST's and QST's side networks are staged like the backbone ("side_network"; docs/methods/lst.md and qst.md,
"Swin"): side blocks are `SwinLayer`s at width d'_s = H_s·round(C_s/(r·H_s)) per stage s (heads kept; QST:
exactly C_s/r), with the window size and shift of the block they mirror, on the same grid; after the last block
of a stage a trainable side patch merging (`SwinPatchMerging` at width d'_s: LayerNorm(4d'_s),
Linear(4d'_s → 2d'_s)) takes the side state to the next stage. The hooks beyond `SideNetworkHooks` that a
staged side network needs are grouped below ("staged side networks").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import Backbone, UnsupportedModel
from .side_network import PruneGroup, SideNetworkHooks, nearest_width, norm_step


@dataclass(frozen=True)
class PruneMerge:
    """A patch merging in LST's pruning chain (docs/methods/lst.md "Swin"). Its input concatenates `parts`
    neighbour copies of the residual stream (part k holds dims k·C .. k·C + C − 1), so the residual index set
    P (C wide) is tiled as k·C + P for every part: the norm at `norm` (4C wide) takes the tiled dims, the
    linear at `linear` (4C → 2C) takes them as its columns and keeps its own top rows, the next stage's P."""
    norm: str = "norm"
    linear: str = "reduction"
    parts: int = 4


class SwinBackbone(SideNetworkHooks, Backbone):
    family = "swin"
    input_keys = ("pixel_values",)
    lora_targets = ("q_proj", "v_proj")
    ia3_targets = ("k_proj", "v_proj", "mlp.fc2")
    ia3_feedforward = ("mlp.fc2",)
    # The blocks' sub-layer outputs; the patch merging's `reduction` is a stage transition, not a site.
    adapter_sites = ("attention.o_proj", "mlp.fc2")
    capabilities = frozenset({"encoder", "single_stack", "stages", "side_network"})   # stages: base.py "stages"
    one_width = False
    gaps = {"sublayers": "its width doubles at each patch merging between stages, so no reversible coupling of one "
                         "width runs through the stack"}
    token_layout = "grid"                 # every token is a patch-grid cell (no [CLS]); the grid shrinks per stage

    def __init__(self, model):
        super().__init__(model)
        depths = list(model.config.depths)
        # Block i → its stage; stage s starts at block sum(depths[:s]).
        self._stage_of = tuple(s for s, n in enumerate(depths) for _ in range(n))
        self._starts = tuple(sum(depths[:s]) for s in range(len(depths)))

    # -- shape facts -----------------------------------------------------------------------------------
    @property
    def stages(self) -> nn.ModuleList:
        return self.model.encoder.layers              # HF SwinStage: .blocks, then .downsample (or None)

    @property
    def blocks(self):
        # A fresh list over the stages' own layers (not registered here, so no parameter is listed twice).
        return nn.ModuleList([layer for stage in self.stages for layer in stage.blocks])

    @property
    def num_layers(self):
        return len(self._stage_of)

    @property
    def hidden_size(self):
        """Width of the last stage: what `finish` and `pool` see (config.hidden_size = embed_dim·2^(S−1))."""
        return self.config.hidden_size

    @property
    def block_widths(self):
        return tuple(int(self.config.embed_dim * 2 ** s) for s in self._stage_of)

    @property
    def stage_starts(self):
        return self._starts

    def stage_grid(self, stage, ctx):
        return ctx["stage_grids"][stage]

    # -- the protocol ----------------------------------------------------------------------------------
    def embed(self, batch):
        px = batch["pixel_values"]                                     # B×3×H×W
        # Patch embedding (padded to a multiple of the patch size), LayerNorm, absolute positions where the
        # checkpoint has them (interpolated for other input sizes, as ViT).
        h, grid = self.model.embeddings(px, interpolate_pos_encoding=True)   # B×(rows·cols)×C, (rows, cols)
        grids = [tuple(grid)]
        for stage in self.stages[:-1]:                                 # each merge halves the grid (rounded up)
            rows, cols = grids[-1]
            grids.append(((rows + 1) // 2, (cols + 1) // 2) if stage.downsample is not None else (rows, cols))
        # No padding, so no attention mask; "grid" is the last stage's (what `finish` and `pool` see).
        return h, {"grid": grids[-1], "stage_grids": tuple(grids)}

    def run_block_in_stage(self, i, h, ctx):
        s = self._stage_of[i]
        layer = self.stages[s].blocks[i - self._starts[s]]
        out, _ = layer(h, ctx["stage_grids"][s])                      # B×T_s×C_s (attention weights unused)
        return out

    def stage_transition(self, i, h, ctx):
        s = self._stage_of[i]
        merge = self.stages[s].downsample
        last = i == self._starts[s] + len(self.stages[s].blocks) - 1
        if not last or merge is None:
            return h
        return merge(h, ctx["stage_grids"][s])                        # B×T_s×C_s → B×⌈T_s/4⌉×2C_s

    def run_block(self, i, h, ctx):
        return self.stage_transition(i, self.run_block_in_stage(i, h, ctx), ctx)

    @property
    def final_norm(self):
        return self.model.layernorm

    def finish(self, h, ctx):
        return self.model.layernorm(h)

    def pool(self, h, ctx):
        return h.mean(dim=1)                                           # B×C: the mean of all tokens, as HF's pooler

    def example_batch(self, batch_size, length=None, device=None):
        # Always the config's size: `length` counts text tokens, and a grid smaller than a window would make
        # HF's layers shrink their window (in place) for every later input.
        size = self.config.image_size
        return {"pixel_values": torch.randn(batch_size, 3, size, size, device=device)}

    # -- side networks (LST; see side_network.py and docs/methods/lst.md "Swin") ----------------------------
    # One side config serves every stage: SwinLayer takes its width and head count as arguments and reads the
    # rest (window size, MLP ratio, dropouts, LayerNorm eps, attention kernel) from the config. The config
    # carries the per-stage side widths (`side_stage_widths`) and the backbone layers its side blocks mirror
    # (`side_layers`), since num_hidden_layers is an alias of num_layers (the stage count) here.
    # "auto" is eager: SwinAttention hands its trainable relative-position bias (plus the shift mask) to the kernel
    # as an additive mask, and a mask that needs a gradient keeps PyTorch's CPU SDPA on the map-storing math path
    # (the same saved bytes as eager), which memtune's planner does not model. attention="sdpa" runs it anyway.
    fused_side_attention = False
    side_dropout_fields = ("hidden_dropout_prob",)
    side_attention_dropout_field = "attention_probs_dropout_prob"

    def side_widths(self, config, r, heads, exact):
        """d'_s = H_s·round(C_s/(r·H_s)) per stage (head width round(d_kv/r), at least 1; exact: C_s/r), with
        embed_dim = d'_0 and hidden_size = d'_last, the widths W0 writes and W_up reads."""
        widths = []
        for s, H in enumerate(config.num_heads):
            C = int(config.embed_dim * 2 ** s)
            widths.append(C // r if exact else H * nearest_width(C, r * H))
        return {"embed_dim": widths[0], "hidden_size": widths[-1], "side_stage_widths": tuple(widths)}

    def side_width_problem(self, r, heads=None):
        """Why the exact widths d'_s = C_s/r (QST) do not fit some stage s, or None: r must divide every stage width
        C_s, and C_s/r must be divisible by that stage's head count H_s (kept; heads: one count for every stage)."""
        for s, H in enumerate(self.config.num_heads):
            C, H = int(self.config.embed_dim * 2 ** s), H if heads is None else heads
            if C % r:
                return f"stage {s}'s width {C} is not divisible by r={r}"
            if (C // r) % H:
                return f"stage {s}'s side width {C}/r={C // r} is not divisible by its {H} attention heads (kept)"
        return None

    def side_config(self, stack_config, r, keep=None, dropout=None, attention="auto", attention_dropout=None,
                    heads=None, exact=False):
        """`SideNetworkHooks.side_config`, recording the mirrored layers in `side_layers` (all without keep)."""
        c = super().side_config(stack_config, r, None, dropout, attention, attention_dropout, heads, exact)
        c.side_layers = tuple(range(self.num_layers)) if keep is None else tuple(keep)
        return c

    def make_side_block(self, cfg, index, decoder=False):
        """The side block mirroring layer i = cfg.side_layers[index]: a SwinLayer at width d'_s with the heads of
        stage s, no stochastic depth, and the shift of HF's SwinStage (0 on even blocks of a stage, half a window
        on odd ones, as backbone block i). Like it, the block turns shifting off on a grid ≤ the window."""
        from transformers.models.swin.modeling_swin import SwinLayer

        i = cfg.side_layers[index]
        s = self._stage_of[i]
        shift = 0 if (i - self._starts[s]) % 2 == 0 else cfg.window_size // 2
        block = SwinLayer(cfg, dim=cfg.side_stage_widths[s], input_resolution=self.blocks[i].input_resolution,
                          num_heads=cfg.num_heads[s], shift_size=shift)
        block.side_stage = s                                           # which of ctx["stage_grids"] it sees
        return block

    def side_norm(self, d_side, cfg):
        return nn.LayerNorm(d_side, eps=cfg.layer_norm_eps)

    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        return {"stage_grids": ctx["stage_grids"]}        # the shift masks are the side blocks' own (per grid)

    def run_side_block(self, block, s, sctx):
        out, _ = block(s, sctx["stage_grids"][block.side_stage])      # B×T_s×d'_s
        return out

    @property
    def pruning_embedding(self):
        return self.model.embeddings.patch_embeddings.projection.weight      # C_0×3×p×p

    def pruning_plan(self, block):
        return [norm_step(block, "layernorm_before"),
                PruneGroup(("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attention.o_proj"),
                norm_step(block, "layernorm_after"), PruneGroup(("mlp.fc1",), "mlp.fc2")]

    # -- staged side networks (LST; docs/methods/lst.md "Swin") -------------------------------------------------
    # Every side block copies its own backbone block's relative-position table ((2W−1)²×H_s) whole.
    side_block_tables = ("attention.relative_position_bias.relative_position_bias_table",)
    merge_pruning = PruneMerge()

    def side_block_widths(self, cfg) -> tuple[int, ...]:
        """d'_i of each backbone block i: its stage's side width."""
        return tuple(cfg.side_stage_widths[s] for s in self._stage_of)

    def stage_merges(self) -> dict[int, nn.Module]:
        """Block index → the frozen patch merging after it (the last block of each stage that has one)."""
        return {self._starts[s] + len(stage.blocks) - 1: stage.downsample
                for s, stage in enumerate(self.stages) if stage.downsample is not None}

    def make_side_transitions(self, cfg) -> dict[int, nn.Module]:
        """Block index → the trainable side patch merging after it: LayerNorm(4d'_s) and Linear(4d'_s → d'_(s+1)),
        d'_(s+1) = 2d'_s whenever the rounding of the per-stage widths keeps the backbone's doubling."""
        from transformers.models.swin.modeling_swin import SwinPatchMerging

        out = {}
        for i in self.stage_merges():
            s = self._stage_of[i]
            d, d_next = cfg.side_stage_widths[s], cfg.side_stage_widths[s + 1]
            merge = SwinPatchMerging(d)
            if d_next != 2 * d:
                merge.reduction = nn.Linear(4 * d, d_next, bias=False)
            merge.side_stage = s
            out[i] = merge
        return out

    def run_side_transition(self, merge, s, sctx):
        return merge(s, sctx["stage_grids"][merge.side_stage])        # B×T_s×d'_s → B×⌈T_s/4⌉×d'_(s+1)

    # -- planner facts (see Backbone) --------------------------------------------------------------------
    modality = "image"
    depth_fields = ("depths",)
    pooling = "mean over all tokens of the final-LayerNorm output (B×d), as HF's pooler"

    @classmethod
    def size_fields(cls, model_type):
        return ("embed_dim", "depths", "num_heads", "window_size", "patch_size")

    @classmethod
    def depth(cls, config):
        return sum(config.depths)

    @classmethod
    def stacks_equally_deep(cls, config):
        # Stages differ in width and tokens, so a plan is never extrapolated from a shallower copy.
        return False

    @classmethod
    def with_depth(cls, config, blocks):
        raise UnsupportedModel("swin: the depth is set per stage (config.depths); a plan runs the full model")

    @classmethod
    def default_image_size(cls, config):
        return int(config.image_size)

    @classmethod
    def image_tokens(cls, config, image_size):
        return (-(-image_size // config.patch_size)) ** 2             # first stage's grid (padded up to a patch)

    @classmethod
    def tiny_configs(cls):
        from transformers import SwinConfig

        # 32 px, patch 2: a 16×16 grid in stage 0, 8×8 in stage 1 (widths 16, 32). Windows of 4×4 cells tile
        # both grids and both are larger than a window, so every second block shifts by 2 cells: shifted
        # windows and their attention mask run in both stages (HF turns shifting off on a grid ≤ the window).
        return {"tiny-swin": SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                                        window_size=4)}

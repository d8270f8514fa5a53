"""Swin Transformer encoders (transformers' `SwinModel`): a hierarchical image encoder.

Stages of pre-norm window-attention blocks; within a stage every second block shifts its windows by half a
window (with the attention mask that keeps shifted windows apart), and between stages a frozen patch merging
joins each 2×2 patch neighbourhood: tokens /4, width ×2. The stack ends with a LayerNorm and mean pooling
over all tokens (HF's pooler); there is no [CLS] token.

The blocks (HF `SwinLayer`s) are one flat list in stage order, and the width changes per stage, so the
backbone states its stages (`stage_starts`, `block_widths`, base.py), declares the "stages" capability (SHERL
then pools and projects each stage's outputs to its guide's grid and width) and sets `one_width = False`: LST,
QST (side networks of width d/r) and MEFT (reversible couplings of width d) are refused through "side_network"
and "sublayers", which Swin does not declare.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Backbone, UnsupportedModel


class SwinBackbone(Backbone):
    family = "swin"
    input_keys = ("pixel_values",)
    lora_targets = ("q_proj", "v_proj")
    ia3_targets = ("k_proj", "v_proj", "mlp.fc2")
    ia3_feedforward = ("mlp.fc2",)
    # The blocks' sub-layer outputs; the patch merging's `reduction` is a stage transition, not a site.
    adapter_sites = ("attention.o_proj", "mlp.fc2")
    capabilities = frozenset({"encoder", "single_stack", "stages"})   # stages: base.py "stages" section
    one_width = False
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

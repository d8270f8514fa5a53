"""ViT-like encoders: ViT and DINOv2 (pre-norm blocks, CLS token, optional layer scale)."""
from __future__ import annotations

import torch

from .base import Backbone, Context


class ViTLikeBackbone(Backbone):
    family = "vit"
    input_keys = ("pixel_values",)
    lora_targets = ("q_proj", "v_proj")
    ia3_targets = ("k_proj", "v_proj", "mlp.fc2")
    ia3_feedforward = ("mlp.fc2",)
    adapter_sites = ("attention.o_proj", "mlp.fc2")

    def __init__(self, model):
        super().__init__(model)
        self.is_dinov2 = model.config.model_type.startswith("dinov2")

    @property
    def blocks(self):
        # ViTModel keeps its layers in `.layers`; Dinov2Model in `.encoder.layer`.
        return self.model.layers if hasattr(self.model, "layers") else self.model.encoder.layer

    @property
    def feature_size(self):
        return 2 * self.hidden_size  # [CLS ‖ mean of patch tokens], as DINOv2's own classifier

    @property
    def patch_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the last embedded image's patch grid (set by `embed`)."""
        return getattr(self, "_grid", None)

    def embed(self, batch):
        px = batch["pixel_values"]                            # B×3×H×W
        p = self.config.patch_size
        self._grid = (px.shape[-2] // p, px.shape[-1] // p)
        if self.is_dinov2:
            h = self.model.embeddings(px)                     # interpolates positions itself
        else:
            h = self.model.embeddings(px, interpolate_pos_encoding=True)
        # h: B×(1+rows·cols)×d; no padding, so no attention mask.
        return h, {"grid": self._grid}

    def run_block(self, i, h, ctx):
        return self.blocks[i](h)

    def finish(self, h, ctx):
        return self.model.layernorm(h)

    def pool(self, h, ctx):
        return torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=-1)  # B×2d

    def example_batch(self, batch_size, length=None, device=None):
        size = length or self.config.image_size
        return {"pixel_values": torch.randn(batch_size, 3, size, size, device=device)}

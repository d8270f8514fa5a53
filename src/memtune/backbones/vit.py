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

    # -- sub-layers (for methods that couple attention and feed-forward separately, e.g. MEFT) ----------
    # Pre-LN: each sub-layer is x + branch(LN(x)), residual included, so
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    # `branch_hook(branch_input, branch_output) -> branch_output` may edit the branch (B×T×d) before the
    # residual: after its dropout (ViT), or before its layer scale and drop path (DINOv2, so that what the
    # hook adds is scaled like the branch it sits beside); branch_input is the normalised LN(x).
    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        """x + DropPath(LayerScale(Attn(LN₁(x)))) (DINOv2) or x + Dropout(Attn(LN₁(x))) (ViT)."""
        blk = self.blocks[i]
        if self.is_dinov2:
            n = blk.norm1(x)
            u, _ = blk.attention(n, attention_mask=None)
            if branch_hook is not None:
                u = branch_hook(n, u)
            return blk.drop_path(blk.layer_scale1(u)) + x
        n = blk.layernorm_before(x)
        u, _ = blk.attention(n, None)
        u = blk.dropout(u)
        if branch_hook is not None:
            u = branch_hook(n, u)
        return u + x

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """a + DropPath(LayerScale(MLP(LN₂(a)))) (DINOv2) or a + Dropout(MLP(LN₂(a))) (ViT)."""
        blk = self.blocks[i]
        if self.is_dinov2:
            n = blk.norm2(a)
            u = blk.mlp(n)
            if branch_hook is not None:
                u = branch_hook(n, u)
            return blk.drop_path(blk.layer_scale2(u)) + a
        n = blk.layernorm_after(a)
        u = blk.dropout(blk.mlp(n))
        if branch_hook is not None:
            u = branch_hook(n, u)
        return u + a

"""ViT-like encoders: ViT and DINOv2 (pre-norm blocks, CLS token, optional layer scale)."""
from __future__ import annotations

import torch
from torch import nn

from .base import Backbone
from .side_network import PruneGroup, PruneVector, SideNetworkHooks, has_submodule, nearest_width, norm_step


class ViTLikeBackbone(SideNetworkHooks, Backbone):
    family = "vit"
    input_keys = ("pixel_values",)
    lora_targets = ("q_proj", "v_proj")
    ia3_targets = ("k_proj", "v_proj", "mlp.fc2")
    ia3_feedforward = ("mlp.fc2",)
    adapter_sites = ("attention.o_proj", "mlp.fc2")
    capabilities = frozenset({"encoder", "single_stack", "sublayers", "side_network"})
    token_layout = "grid"                 # [CLS] (and DINOv2 registers) first, then the patch grid

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

    @property
    def final_norm(self):
        return self.model.layernorm

    def finish(self, h, ctx):
        return self.model.layernorm(h)

    def pool(self, h, ctx):
        return torch.cat([h[:, 0], h[:, 1:].mean(dim=1)], dim=-1)  # B×2d

    def example_batch(self, batch_size, length=None, device=None):
        size = length or self.config.image_size
        return {"pixel_values": torch.randn(batch_size, 3, size, size, device=device)}

    # -- side networks (LST, QST; see side_network.py) ---------------------------------------------------
    # The attention reads an explicit head_dim; DINOv2 sizes its MLP as hidden_size·mlp_ratio, which is then
    # d_ff/r by itself.
    supports_side_heads = True
    fused_side_attention = True
    side_dropout_fields = ("hidden_dropout_prob",)
    side_attention_dropout_field = "attention_probs_dropout_prob"

    def side_widths(self, config, r, heads, exact):
        """d' = round(d/r), head width round(H·d_kv/(r·H')) (d_kv/r at H' = H), d_ff' = round(d_ff/r);
        exact: d/r, d'/H', ⌊d_ff/r⌋."""
        H = config.num_attention_heads
        side_heads = heads or H
        if exact:
            d_side = config.hidden_size // r
            widths = {"hidden_size": d_side, "head_dim": d_side // side_heads}
        else:
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // H
            widths = {"hidden_size": nearest_width(config.hidden_size, r),
                      "head_dim": nearest_width(H * head_dim, r * side_heads)}
        widths["num_attention_heads"] = side_heads
        if not self.is_dinov2:
            widths["intermediate_size"] = (config.intermediate_size // r if exact
                                           else nearest_width(config.intermediate_size, r))
        return widths

    def side_norm(self, d_side, cfg):
        return nn.LayerNorm(d_side, eps=cfg.layer_norm_eps)

    @property
    def pruning_embedding(self):
        return self.model.embeddings.patch_embeddings.projection.weight

    def pruning_plan(self, block):
        attn = PruneGroup(("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attention.o_proj")
        if self.is_dinov2:              # layer scales after each sub-layer; a SwiGLU or a plain MLP
            mlp = (PruneGroup(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")
                   if has_submodule(block, "mlp.gate_proj") else PruneGroup(("mlp.fc1",), "mlp.fc2"))
            return [norm_step(block, "norm1"), attn, PruneVector(("layer_scale1.lambda1",)),
                    norm_step(block, "norm2"), mlp, PruneVector(("layer_scale2.lambda1",))]
        return [norm_step(block, "layernorm_before"), attn, norm_step(block, "layernorm_after"),
                PruneGroup(("mlp.fc1",), "mlp.fc2")]

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

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    modality = "image"
    pooling = "cls_and_mean: [h[:, 0] ; mean(h[:, 1:])] (B×2d)"

    @classmethod
    def size_fields(cls, model_type):
        widths = ("intermediate_size",) if model_type == "vit" else ()     # DINOv2: mlp_ratio, defaulted
        return ("hidden_size", "num_hidden_layers", "num_attention_heads", *widths, "patch_size")

    @classmethod
    def default_image_size(cls, config):
        """The config's image size; DINOv2 checkpoints store 518 (their pretraining crop) and their
        processors feed 224."""
        size = int(getattr(config, "image_size", 224))
        return min(size, 224) if config.model_type == "dinov2" else size

    @classmethod
    def image_tokens(cls, config, image_size):
        return (image_size // config.patch_size) ** 2 + 1          # the patch grid and [CLS]

    @classmethod
    def tiny_configs(cls):
        from transformers import Dinov2Config, ViTConfig

        return {"tiny-vit": ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, intermediate_size=128),
                "tiny-dinov2": Dinov2Config(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4,
                                            num_attention_heads=4, mlp_ratio=2)}

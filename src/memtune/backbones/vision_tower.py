"""Vision towers of image–text models: CLIP's (CLIPVisionModel) and SigLIP's (SiglipVisionModel).

Both are pre-norm ViTs built from the same block (CLIPEncoderLayer / SiglipEncoderLayer: layer_norm1 →
self_attn → residual, layer_norm2 → mlp → residual, no residual dropout, attention width d/H) over a
patch embedding with learned absolute positions. They differ only around the stack:

    CLIP:    [CLS ‖ patches] + positions → pre_layrnorm → blocks → (no final norm on the tokens)
             pool: post_layernorm(h[:, 0])                                  the class token, normalised
    SigLIP:  patches + positions → blocks → post_layernorm
             pool: the attention-pooling head (a learned probe attends to every token, then LN + MLP)

One file holds both because everything the protocol and the side methods touch inside the stack (blocks,
sub-layers, side blocks, the pruning plan) is the same code; the two differences (a class token with its
pre-norm, and where the final norm and pooling sit) are two small subclasses. Each model type is its own
family, so the support matrix and every refusal name the model the user has, and each family's tiny alias
is `tiny-<family>`.

Token layout "grid": CLIP's class token comes first, then the rows·cols patch grid (SigLIP: the grid alone),
so DTL's patch-grid injection and `grid_tokens` apply to both. DTL pools the patch grid and then applies
`finish`: SigLIP's post_layernorm; CLIP's stack has no final norm on the tokens (its post_layernorm is part of
the class-token pooling), so DTL's features on CLIP are the plain mean of the patch tokens.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .base import Backbone, residual_sublayer
from .side_network import PruneGroup, SideNetworkHooks, head_multiple_widths, norm_step


def _pair(size) -> tuple[int, int]:
    """A config's patch or image size (an int, or a (height, width) pair) as (height, width)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class VisionTowerBackbone(SideNetworkHooks, Backbone):
    """What CLIP's and SigLIP's vision towers share: the block, its sub-layers and the side-network hooks."""
    input_keys = ("pixel_values",)
    lora_targets = ("q_proj", "v_proj")
    # "mlp.fc2" also names the FFN output of SigLIP's pooling head (head.mlp.fc2): it is a pretrained FFN of
    # the same kind, so IA3 and adapters treat it like the blocks' (the baseline counts match by name too).
    ia3_targets = ("k_proj", "v_proj", "mlp.fc2")
    ia3_feedforward = ("mlp.fc2",)
    adapter_sites = ("self_attn.out_proj", "mlp.fc2")
    capabilities = frozenset({"encoder", "single_stack", "sublayers", "side_network"})
    token_layout = "grid"
    # Tokens before the patch grid (CLIP: the class token).
    prefix_tokens: ClassVar[int] = 0

    @property
    def blocks(self):
        return self.model.encoder.layers

    @property
    def hidden_dropout(self):
        # The blocks have no residual dropout (the config's only rate is attention_dropout, on the
        # attention probabilities), so adapters that match the blocks' dropout use none.
        return 0.0

    @property
    def patch_grid(self) -> tuple[int, int] | None:
        """(rows, cols) of the last embedded image's patch grid (set by `embed`)."""
        return getattr(self, "_grid", None)

    def embed(self, batch):
        px = batch["pixel_values"]                            # B×3×H×W
        ph, pw = _pair(self.config.patch_size)
        self._grid = (px.shape[-2] // ph, px.shape[-1] // pw)
        # Positions are interpolated for other image sizes; at the config's size the table is used as is.
        h = self.model.embeddings(px, interpolate_pos_encoding=True)  # B×(prefix + rows·cols)×d
        # SigLIP's embedding is the conv output transposed (strides of B×d×T), and every residual add keeps
        # that layout through the whole stack; a contiguous copy (a no-op for CLIP, whose class-token concat
        # already is one) gives every block the layout a replayed trunk cache has, so cached and uncached
        # runs reduce in the same order and agree bit for bit. No padding (every patch is real): no mask.
        return self.embedded(h.contiguous()), {"grid": self._grid}

    def embedded(self, h: torch.Tensor) -> torch.Tensor:
        """The embedding output h (B×T×d) → the first block's input (CLIP: its pre-norm)."""
        return h

    def run_block(self, i, h, ctx):
        return self.blocks[i](h, None)                        # attention_mask None: every token is real

    def example_batch(self, batch_size, length=None, device=None):
        """B×3×S×S pixels at the config's image size; `length` (a text length) does not apply: the token
        count follows from the image size."""
        h, w = _pair(self.config.image_size)
        return {"pixel_values": torch.randn(batch_size, 3, h, w, device=device)}

    # -- side networks (LST, QST; see side_network.py) ---------------------------------------------------
    # The attention class derives its head width from hidden_size / H, so a side width is a multiple of the
    # side head count H' (as BERT). The blocks have no hidden dropout, only the attention-probability one.
    supports_side_heads = True
    fused_side_attention = True
    side_dropout_fields = ()
    side_attention_dropout_field = "attention_dropout"

    def side_widths(self, config, r, heads, exact):
        """d' = H'·round(d/(r·H')) (H' = H: H·round(d_kv/r)) and d_ff' = round(d_ff/r); exact: d/r, ⌊d_ff/r⌋."""
        side_heads = heads or config.num_attention_heads
        d_side, d_ff = head_multiple_widths(config.hidden_size, config.intermediate_size, r, side_heads, exact)
        return {"hidden_size": d_side, "num_attention_heads": side_heads, "intermediate_size": d_ff}

    def side_norm(self, d_side, cfg):
        # Pre-norm side blocks leave their stream unnormalised, so the side ends in a LayerNorm of its own.
        return nn.LayerNorm(d_side, eps=cfg.layer_norm_eps)

    def run_side_block(self, block, s, sctx):
        return block(s, None)                                 # B×T×d' → B×T×d', no mask (no padding)

    @property
    def pruning_embedding(self):
        return self.model.embeddings.patch_embedding.weight   # d×3×p×p

    def pruning_plan(self, block):
        # Pre-norm: each norm reads the residual stream before its sub-layer, so it takes the current P.
        return [norm_step(block, "layer_norm1"),
                PruneGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.out_proj"),
                norm_step(block, "layer_norm2"), PruneGroup(("mlp.fc1",), "mlp.fc2")]

    # -- sub-layers (for methods that couple attention and feed-forward separately, e.g. MEFT) ----------
    # Pre-LN: each sub-layer is x + branch(LN(x)), residual included, so
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    # `branch_hook(branch_input, branch_output) -> branch_output` may edit the branch (B×T×d) before the
    # residual; branch_input is the normalised LN(x). There is no residual dropout to come before it.
    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        """x + W_o·SelfAttn(LN₁(x)): B×T×d → B×T×d."""
        blk = self.blocks[i]
        return residual_sublayer(x, lambda n: blk.self_attn(n, None)[0], blk.layer_norm1, "pre", branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """a + W_2·act(W_1·LN₂(a)): B×T×d → B×T×d."""
        blk = self.blocks[i]
        return residual_sublayer(a, blk.mlp, blk.layer_norm2, "pre", branch_hook)

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    modality = "image"

    @classmethod
    def size_fields(cls, model_type):
        return ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size")

    @classmethod
    def default_image_size(cls, config):
        """The config's image size (the checkpoints' pretraining resolution: 224 for the base models)."""
        return _pair(getattr(config, "image_size", 224))[0]

    @classmethod
    def image_tokens(cls, config, image_size):
        ph, pw = _pair(config.patch_size)
        return (image_size // ph) * (image_size // pw) + cls.prefix_tokens


class CLIPVisionBackbone(VisionTowerBackbone):
    """CLIP's vision tower: a class token, a LayerNorm before the blocks (`pre_layrnorm`, transformers'
    spelling), none after them; the pooled feature is the class token through `post_layernorm`."""
    family = "clip-vision"
    prefix_tokens = 1

    def embedded(self, h):
        return self.model.pre_layrnorm(h)                     # B×(1 + rows·cols)×d

    # final_norm stays None and finish the identity: CLIPVisionModel's last_hidden_state is the last block's
    # output as it is; post_layernorm is part of the pooling (LayerNorm acts per token, so normalising the
    # class token alone is the same as normalising every token and then taking it).
    def pool(self, h, ctx):
        return self.model.post_layernorm(h[:, 0])            # B×d

    pooling = "cls: post_layernorm(h[:, 0]) (B×d)"

    @classmethod
    def tiny_configs(cls):
        from transformers import CLIPVisionConfig

        return {"tiny-clip-vision": CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64,
                                                     num_hidden_layers=4, num_attention_heads=4,
                                                     intermediate_size=128)}


class SiglipVisionBackbone(VisionTowerBackbone):
    """SigLIP's vision tower: the patch grid alone (no class token), `post_layernorm` after the blocks, and
    the attention-pooling head (`head`, where the config's vision_use_head keeps it) as the pooling."""
    family = "siglip-vision"
    prefix_tokens = 0

    @property
    def final_norm(self):
        return self.model.post_layernorm

    def finish(self, h, ctx):
        return self.model.post_layernorm(h)

    def pool(self, h, ctx):
        """The pretrained attention-pooling head (a learned probe attends to every token, then a residual
        LN + MLP): B×T×d → B×d; without a head the mean over tokens."""
        head = getattr(self.model, "head", None)
        return head(h) if head is not None else h.mean(dim=1)

    pooling = "map: the attention-pooling head on h (B×d; mean over tokens where the model has no head)"

    @classmethod
    def tiny_configs(cls):
        from transformers import SiglipVisionConfig

        return {"tiny-siglip-vision": SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=64,
                                                         num_hidden_layers=4, num_attention_heads=4,
                                                         intermediate_size=128)}

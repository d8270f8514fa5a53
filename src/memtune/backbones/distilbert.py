"""DistilBERT encoders (DistilBertModel): post-LN blocks like BERT's, six of them, no token types or pooler.

DistilBertConfig names its widths dim / hidden_dim / n_heads / n_layers; its attribute_map answers hidden_size,
num_attention_heads and num_hidden_layers from them (there is no alias for hidden_dim), so the protocol's
defaults read the right values and only the side config and the planner facts need DistilBERT's own names.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from .base import Backbone, Context, residual_sublayer
from .side_network import PruneGroup, SideNetworkHooks, head_multiple_widths, norm_step


class DistilBertBackbone(SideNetworkHooks, Backbone):
    family = "distilbert"
    dropout_field = "dropout"
    activation_field = "activation"
    input_keys = ("input_ids", "attention_mask")
    lora_targets = ("q_lin", "v_lin")
    ia3_targets = ("k_lin", "v_lin", "lin2")
    ia3_feedforward = ("lin2",)
    adapter_sites = ("attention.out_lin", "ffn.lin2")
    norm_position = "post"
    capabilities = frozenset({"encoder", "single_stack", "sublayers", "side_network"})

    @property
    def blocks(self):
        return self.model.transformer.layer

    def embed(self, batch):
        ids = batch["input_ids"]                              # B×T
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        # word + learned positions 0..T-1, LayerNorm, dropout: B×T×d
        h = self.model.embeddings(ids)
        ctx: Context = {
            "token_mask": mask,
            # the additive B×1×T×T mask (or None / SDPA's form) that DistilBertModel.forward builds
            "attn_mask": create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=mask),
        }
        return h, ctx

    def run_block(self, i, h, ctx):
        return self.blocks[i](h, attention_mask=ctx["attn_mask"])

    # -- side networks (LST, QST; see side_network.py) ---------------------------------------------------
    # The attention class derives its head width from dim / n_heads, so a side width is a multiple of the side
    # head count H'. The blocks are post-LN and the backbone has no final norm, so the side has none. One
    # hidden dropout rate (`dropout`: embeddings and FFN output) and one on the attention probabilities.
    supports_side_heads = True
    fused_side_attention = True
    side_dropout_fields = ("dropout",)
    side_attention_dropout_field = "attention_dropout"

    def side_widths(self, config, r, heads, exact):
        """d' = H'·round(d/(r·H')) (H' = H: H·round(d_kv/r)) and d_ff' = round(d_ff/r); exact: d/r, ⌊d_ff/r⌋."""
        side_heads = heads or config.n_heads
        d_side, d_ff = head_multiple_widths(config.dim, config.hidden_dim, r, side_heads, exact)
        return {"dim": d_side, "n_heads": side_heads, "hidden_dim": d_ff}

    def side_norm(self, d_side, cfg):
        return nn.Identity()

    @torch.no_grad()
    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        return {"mask": create_bidirectional_mask(config=cfg, inputs_embeds=s, attention_mask=ctx["token_mask"])}

    def run_side_block(self, block, s, sctx):
        return block(s, attention_mask=sctx["mask"])          # TransformerBlock returns the B×T×d' tensor

    @property
    def pruning_embedding(self):
        return self.model.embeddings.word_embeddings.weight

    def pruning_plan(self, block):
        attn = PruneGroup(("attention.q_lin", "attention.k_lin", "attention.v_lin"), "attention.out_lin")
        ffn = PruneGroup(("ffn.lin1",), "ffn.lin2")
        # Post-LN: each norm follows its sub-layer's output projection, so it takes the new P.
        return [attn, norm_step(block, "sa_layer_norm"), ffn, norm_step(block, "output_layer_norm")]

    # -- sub-layers (for methods that couple attention and feed-forward separately, e.g. MEFT) ----------
    # Post-LN: each sub-layer is LN(x + branch(x)), residual and LayerNorm included, so
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    # `branch_hook(branch_input, branch_output) -> branch_output` may edit the branch (B×T×d) before the
    # residual + LayerNorm; branch_input is the sub-layer input itself. Unlike BERT, DistilBERT puts no
    # dropout after the attention output projection (only on the attention probabilities, inside).
    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        """a = LN_sa(x + W_o·SelfAttn(x)): B×T×d → B×T×d."""
        blk = self.blocks[i]
        return residual_sublayer(x, lambda n: blk.attention(n, attention_mask=ctx["attn_mask"])[0],
                                 blk.sa_layer_norm, "post", branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """out = LN_out(a + Dropout(W_2·act(W_1·a))): B×T×d → B×T×d."""
        blk = self.blocks[i]          # ffn: lin1 → activation → lin2 → dropout
        return residual_sublayer(a, blk.ffn, blk.output_layer_norm, "post", branch_hook)

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    depth_fields = ("n_layers",)

    @classmethod
    def size_fields(cls, model_type):
        return ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim")

    @classmethod
    def max_positions(cls, config):
        """Learned (or sinusoidal) absolute positions 0..max_position_embeddings - 1."""
        return int(config.max_position_embeddings)

    @classmethod
    def tiny_configs(cls):
        from transformers import DistilBertConfig

        from ..tokenizer import VOCAB_SIZE

        return {"tiny-distilbert": DistilBertConfig(vocab_size=VOCAB_SIZE, dim=64, hidden_dim=128, n_layers=4,
                                                    n_heads=4, max_position_embeddings=512, pad_token_id=0)}

"""BERT-like encoders: BERT, RoBERTa, XLM-R, MiniLM (BertModel) and MPNet (relative position bias)."""
from __future__ import annotations

import torch
from transformers.masking_utils import create_bidirectional_mask

from .base import Backbone, Context


class BertLikeBackbone(Backbone):
    family = "bert"
    input_keys = ("input_ids", "attention_mask", "token_type_ids")
    lora_targets = ("query", "value")  # MPNet names them q, v: see `__init__`
    ia3_targets = ("key", "value", "output.dense")
    ia3_feedforward = ("output.dense",)
    adapter_sites = ("attention.output.dense", "output.dense")

    def __init__(self, model):
        super().__init__(model)
        self.is_mpnet = model.config.model_type == "mpnet"
        if self.is_mpnet:
            # MPNet: attention.attn.{q,k,v,o}; FFN out is output.dense.
            self.lora_targets = ("q", "v")
            self.ia3_targets = ("k", "v", "output.dense")
            self.adapter_sites = ("attention.attn.o", "output.dense")

    @property
    def blocks(self):
        return self.model.encoder.layer

    def embed(self, batch):
        ids = batch["input_ids"]                              # B×T
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if self.is_mpnet:
            h = self.model.embeddings(input_ids=ids)
        else:
            h = self.model.embeddings(input_ids=ids, token_type_ids=batch.get("token_type_ids"))
        ctx: Context = {
            "token_mask": mask,
            "attn_mask": create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=mask),
        }
        if self.is_mpnet:
            # B×H×T×T bucketed relative bias, shared by all layers (no grad: the table is frozen or not,
            # it is computed once per batch like in MPNetEncoder).
            ctx["position_bias"] = self.model.encoder.compute_position_bias(h)
        return h, ctx

    def run_block(self, i, h, ctx):
        layer = self.blocks[i]
        if self.is_mpnet:
            return layer(h, ctx["attn_mask"], ctx["position_bias"])[0]
        return layer(h, attention_mask=ctx["attn_mask"])

    # -- sub-layers (for methods that couple attention and feed-forward separately, e.g. MEFT) ----------
    # Post-LN: each sub-layer is LN(x + branch(x)), residual and LayerNorm included, so
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    # `branch_hook(branch_input, branch_output) -> branch_output` may edit the branch (B×T×d) after its
    # dropout and before the residual + LayerNorm: an adapter in parallel (`out + A(inp)`) or in series
    # (`out + A(out)`). Here branch_input is the sub-layer input x itself (post-LN has no pre-norm).
    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        """a = LN₁(x + Dropout(W_o·SelfAttn(x))): B×T×d → B×T×d."""
        attn = self.blocks[i].attention
        if self.is_mpnet:
            u = attn.dropout(attn.attn(x, ctx["attn_mask"], ctx["position_bias"])[0])
            norm = attn.LayerNorm
        else:
            c, _ = attn.self(x, attention_mask=ctx["attn_mask"])
            u = attn.output.dropout(attn.output.dense(c))
            norm = attn.output.LayerNorm
        if branch_hook is not None:
            u = branch_hook(x, u)
        return norm(u + x)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """out = LN₂(a + Dropout(W_2·act(W_1·a))): B×T×d → B×T×d."""
        layer = self.blocks[i]
        u = layer.output.dropout(layer.output.dense(layer.intermediate(a)))
        if branch_hook is not None:
            u = branch_hook(a, u)
        return layer.output.LayerNorm(u + a)

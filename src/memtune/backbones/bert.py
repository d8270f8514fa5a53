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

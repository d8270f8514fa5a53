"""T5 encoder-decoder. The protocol's `blocks` are the encoder's; the decoder is a second stack.

For classification the decoder reads a single start token and the pooled feature is its output
(B×d), so the whole pretrained network is used as in text-to-text with one output position.
"""
from __future__ import annotations

import torch
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from .base import Backbone, Context


class T5Backbone(Backbone):
    family = "t5"
    input_keys = ("input_ids", "attention_mask", "decoder_input_ids")
    lora_targets = ("q", "v")
    ia3_targets = ("k", "v", "wo")
    ia3_feedforward = ("wo",)
    adapter_sites = ("SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo")

    @property
    def hidden_size(self):
        return self.config.d_model

    @property
    def blocks(self):
        return self.model.encoder.block

    @property
    def decoder_blocks(self):
        return self.model.decoder.block

    # -- encoder stack ----------------------------------------------------------------------------
    def embed(self, batch):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        enc = self.model.encoder
        h = enc.embed_tokens(ids)
        ctx: Context = {
            "batch": batch,
            "token_mask": mask,
            "attn_mask": create_bidirectional_mask(config=enc.config, inputs_embeds=h, attention_mask=mask),
            "position_bias": None,  # B×H×T×T, made by block 0 and shared by the others
        }
        return enc.dropout(h), ctx

    def run_block(self, i, h, ctx):
        h, ctx["position_bias"], _ = self.blocks[i](h, ctx["attn_mask"], ctx["position_bias"])
        return h

    def finish_encoder(self, h):
        enc = self.model.encoder
        return enc.dropout(enc.final_layer_norm(h))

    # -- decoder stack ----------------------------------------------------------------------------
    def decoder_ids(self, batch) -> torch.Tensor:
        ids = batch.get("decoder_input_ids")
        if ids is None:
            start = self.config.decoder_start_token_id or 0
            ids = torch.full((batch["input_ids"].shape[0], 1), start, device=batch["input_ids"].device)
        return ids

    def decoder_embed(self, batch, memory, memory_mask):
        """memory: encoder output B×Ts×d. Returns the decoder stream B×Tt×d and its ctx."""
        dec = self.model.decoder
        ids = self.decoder_ids(batch)
        h = dec.embed_tokens(ids)
        ctx: Context = {
            "memory": memory,
            "attn_mask": create_causal_mask(config=dec.config, inputs_embeds=h, attention_mask=None,
                                            past_key_values=None),
            "cross_mask": create_bidirectional_mask(config=dec.config, inputs_embeds=h,
                                                    attention_mask=memory_mask, encoder_hidden_states=memory),
            "position_bias": None,
            "cross_bias": None,
        }
        return dec.dropout(h), ctx

    def run_decoder_block(self, i, h, ctx):
        h, ctx["position_bias"], ctx["cross_bias"] = self.decoder_blocks[i](
            h, ctx["attn_mask"], ctx["position_bias"], ctx["memory"], ctx["cross_mask"], ctx["cross_bias"]
        )
        return h

    def finish_decoder(self, h):
        dec = self.model.decoder
        return dec.dropout(dec.final_layer_norm(h))

    def finish(self, h, ctx):
        """Encoder output → the decoder's finished states B×Tt×d (the whole encoder-decoder pass)."""
        memory = self.finish_encoder(h)
        d, dctx = self.decoder_embed(ctx["batch"], memory, ctx["token_mask"])
        for i in range(len(self.decoder_blocks)):
            d = self.run_decoder_block(i, d, dctx)
        return self.finish_decoder(d)

    def pool(self, h, ctx):
        return h[:, 0]  # the start position's decoder output: B×d

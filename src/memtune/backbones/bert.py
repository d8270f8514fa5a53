"""BERT-like encoders: BERT, RoBERTa, XLM-R, MiniLM (BertModel) and MPNet (relative position bias)."""
from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from .base import Backbone, Context, residual_sublayer
from .side_network import PruneGroup, SideNetworkHooks, head_multiple_widths, norm_step


class BertLikeBackbone(SideNetworkHooks, Backbone):
    family = "bert"
    input_keys = ("input_ids", "attention_mask", "token_type_ids")
    lora_targets = ("query", "value")  # MPNet names them q, v: see `__init__`
    ia3_targets = ("key", "value", "output.dense")
    ia3_feedforward = ("output.dense",)
    adapter_sites = ("attention.output.dense", "output.dense")
    norm_position = "post"
    capabilities = frozenset({"encoder", "single_stack", "sublayers", "side_network"})

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

    # -- side networks (LST, QST; see side_network.py) ---------------------------------------------------
    # The attention class derives its head width from hidden_size / H, so a side width is a multiple of the
    # side head count H'. The blocks are post-LN and the backbone has no final norm, so the side has none.
    side_dropout_fields = ("hidden_dropout_prob",)
    side_attention_dropout_field = "attention_probs_dropout_prob"

    @property
    def supports_side_heads(self):
        return not self.is_mpnet            # MPNet's relative position bias has H heads

    @property
    def fused_side_attention(self):
        return not self.is_mpnet            # MPNet's attention class has no fused path

    def side_widths(self, config, r, heads, exact):
        """d' = H'·round(d/(r·H')) (H' = H: H·round(d_kv/r)) and d_ff' = round(d_ff/r); exact: d/r, ⌊d_ff/r⌋."""
        side_heads = heads or config.num_attention_heads
        d_side, d_ff = head_multiple_widths(config.hidden_size, config.intermediate_size, r, side_heads, exact)
        return {"hidden_size": d_side, "num_attention_heads": side_heads, "intermediate_size": d_ff}

    def side_norm(self, d_side, cfg):
        return nn.Identity()

    @torch.no_grad()
    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        sctx = {"mask": create_bidirectional_mask(config=cfg, inputs_embeds=s, attention_mask=ctx["token_mask"])}
        if self.is_mpnet:
            sctx["position_bias"] = ctx["position_bias"]     # B×H×T×T: the side keeps the H heads
        return sctx

    def run_side_block(self, block, s, sctx):
        if self.is_mpnet:
            return block(s, sctx["mask"], sctx["position_bias"])[0]
        out = block(s, attention_mask=sctx["mask"])
        return out[0] if isinstance(out, tuple) else out

    @property
    def pruning_embedding(self):
        return self.model.embeddings.word_embeddings.weight

    def pruning_plan(self, block):
        if self.is_mpnet:
            attn = PruneGroup(("attention.attn.q", "attention.attn.k", "attention.attn.v"), "attention.attn.o")
            attn_norm = "attention.LayerNorm"
        else:
            attn = PruneGroup(("attention.self.query", "attention.self.key", "attention.self.value"),
                              "attention.output.dense")
            attn_norm = "attention.output.LayerNorm"
        # Post-LN: each norm follows its sub-layer's output projection, so it takes the new P.
        return [attn, norm_step(block, attn_norm), PruneGroup(("intermediate.dense",), "output.dense"),
                norm_step(block, "output.LayerNorm")]

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
            return residual_sublayer(x, lambda n: attn.dropout(attn.attn(n, ctx["attn_mask"], ctx["position_bias"])[0]),
                                     attn.LayerNorm, "post", branch_hook)
        out = attn.output
        return residual_sublayer(x, lambda n: out.dropout(out.dense(attn.self(n, attention_mask=ctx["attn_mask"])[0])),
                                 out.LayerNorm, "post", branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """out = LN₂(a + Dropout(W_2·act(W_1·a))): B×T×d → B×T×d."""
        out = self.blocks[i].output
        return residual_sublayer(a, lambda n: out.dropout(out.dense(self.blocks[i].intermediate(n))), out.LayerNorm,
                                 "post", branch_hook)

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    @classmethod
    def max_positions(cls, config):
        """Learned absolute positions: BERT numbers them from 0, the RoBERTa-style models (RoBERTa, XLM-R,
        MPNet) from pad_token_id + 1."""
        n = int(config.max_position_embeddings)
        if config.model_type != "bert":
            n -= int(getattr(config, "pad_token_id", 1) or 0) + 1
        return n

    @classmethod
    def planning_batch(cls, config, batch_size, max_length, image_size=None, target_length=1,
                       dtype=torch.float32, device="meta"):
        batch = super().planning_batch(config, batch_size, max_length, device=device)
        if getattr(config, "type_vocab_size", 0) and config.model_type != "mpnet":
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])      # what BERT tokenizers return
        return batch

    @classmethod
    def tiny_configs(cls):
        from transformers import BertConfig

        from ..tokenizer import VOCAB_SIZE

        return {"tiny-bert": BertConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=512)}

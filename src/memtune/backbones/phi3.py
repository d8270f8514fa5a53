"""Phi-3 decoders (Abdin et al., 2024): a Llama-like pre-norm decoder (RMSNorm, rotary positions, SwiGLU) whose
attention reads q, k, v from one fused `qkv_proj` (rows [q (H·d_kv) | k (KV·d_kv) | v (KV·d_kv)]) and whose MLP
reads gate and up from one fused `gate_up_proj` (rows [gate (d_ff) | up (d_ff)]).

Besides the fused projections Phi-3 differs from Llama in three places: a residual dropout on each branch
(`resid_pdrop`), an optional sliding attention window (`sliding_window`; Phi-3-mini-4k: 2047 tokens), and a
rotary table that may cover part of each head (`partial_rotary_factor`).
"""
from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .base import Context, residual_sublayer
from .llama import LlamaLikeBackbone
from .side_network import Fused, PruneGroup, norm_step


def causal_mask(config, h, mask, cache, positions):
    """The attention mask Phi3Model builds: causal, limited to the last `sliding_window` tokens where the config
    has one (h: B×L×d, mask: B×(past + L))."""
    make = create_causal_mask if config.sliding_window is None else create_sliding_window_causal_mask
    return make(config=config, inputs_embeds=h, attention_mask=mask, past_key_values=cache, position_ids=positions)


class Phi3Backbone(LlamaLikeBackbone):
    family = "phi3"
    # The fused projections are the linear layers there are: LoRA adapts q, k and v together, IA3 rescales
    # q, k, v (the paper's l_k, l_v, plus l_q) and the FFN input of the down projection.
    lora_targets = ("qkv_proj",)
    ia3_targets = ("qkv_proj", "down_proj")
    ia3_feedforward = ("down_proj",)
    adapter_sites = ("self_attn.o_proj", "mlp.down_proj")
    dropout_field = "resid_pdrop"

    def embed(self, batch):
        ids = batch["input_ids"]                              # B×T
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        h = self.decoder.embed_tokens(ids)                    # B×T×d (Phi3Model applies no embedding dropout)
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        ctx: Context = {
            "token_mask": mask,
            "position_ids": pos,
            "attn_mask": causal_mask(self.config, h, mask, None, pos),
            "rope": self.decoder.rotary_emb(h, position_ids=pos),  # (cos, sin), each 1×T×rotary width
        }
        return h, ctx

    # -- side networks (LST, QST): Llama's widths and rotary tables; Phi-3's mask and dropout -----------
    side_dropout_fields = ("resid_pdrop",)

    @torch.no_grad()
    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        pos = ctx["position_ids"]
        return {"mask": causal_mask(cfg, s, ctx["token_mask"], cache, pos), "rope": rotary(s, pos), "pos": pos,
                "cache": cache}

    def embed_new_tokens(self, ids, mask, positions, cache):
        """New tokens ids (B×L) at `positions` (B×L) for cached decoding; mask B×(past + L)."""
        h = self.decoder.embed_tokens(ids)
        ctx: Context = {
            "token_mask": mask,
            "position_ids": positions,
            "attn_mask": causal_mask(self.config, h, mask, cache, positions),
            "rope": self.decoder.rotary_emb(h, position_ids=positions),
            "cache": cache,
        }
        return h, ctx

    def pruning_plan(self, block):
        # qkv_proj's parts have H, KV, KV heads of d_kv rows; grouped KV heads take the head-structured
        # selection (rotary pairs (j, j + d_kv/2): exact for a full rotary table, an approximation where
        # partial_rotary_factor < 1). gate_up_proj's two parts share rows as Llama's gate and up do.
        a = block.self_attn
        H, KV = a.config.num_attention_heads, a.config.num_key_value_heads
        return [norm_step(block, "input_layernorm"),
                PruneGroup((Fused("self_attn.qkv_proj", (H, KV, KV)),), "self_attn.o_proj", (H, KV, a.head_dim)),
                norm_step(block, "post_attention_layernorm"),
                PruneGroup((Fused("mlp.gate_up_proj", (1, 1)),), "mlp.down_proj")]

    # -- sub-layers (MEFT): x + Dropout(branch(RMSNorm(x))), residual included, so that
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    # branch_hook(RMSNorm(x), branch) sees the branch after its residual dropout.
    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        blk = self.blocks[i]

        def attn(n):
            u = blk.self_attn(hidden_states=n, attention_mask=ctx["attn_mask"], position_ids=ctx["position_ids"],
                              past_key_values=None, use_cache=False, position_embeddings=ctx["rope"])[0]
            return blk.resid_attn_dropout(u)

        return residual_sublayer(x, attn, blk.input_layernorm, "pre", branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        blk = self.blocks[i]
        return residual_sublayer(a, lambda n: blk.resid_mlp_dropout(blk.mlp(n)), blk.post_attention_layernorm,
                                 "pre", branch_hook)

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    @classmethod
    def tiny_configs(cls):
        from transformers import Phi3Config

        from ..tokenizer import VOCAB_SIZE

        # Grouped KV heads (KV = 2 < H = 4), so the fused qkv_proj has parts of unequal size; a residual dropout,
        # so the dropout paths run. The LM head is tied, as in the other tiny decoders (Phi-3 unties it: an
        # untied head is a tensor that full fine-tuning for classification would train without a gradient).
        return {"tiny-phi3": Phi3Config(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        resid_pdrop=0.1, max_position_embeddings=512,
                                        original_max_position_embeddings=512, pad_token_id=0, bos_token_id=2,
                                        eos_token_id=3, tie_word_embeddings=True)}

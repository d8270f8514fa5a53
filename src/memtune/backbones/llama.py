"""Llama-like decoders (Llama, SmolLM2, Mistral, Qwen2, Qwen3): causal self-attention with rotary positions.

Qwen3's block is Llama's plus an RMSNorm over each head's d_kv dims of q and of k (`self_attn.q_norm`,
`k_norm`, one weight of d_kv shared by every head), applied before the rotation; its decoder layer takes
Llama's call, so only the side widths (the norms are built at the side head width) and the pruning plan see it.
Stacks with sliding-window layers (Qwen2/Qwen3 with `use_sliding_window`) are refused: the blocks here all
get the one causal mask.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from transformers.masking_utils import create_causal_mask

from .base import Backbone, Context, UnsupportedModel, residual_sublayer
from .side_network import PruneGroup, SideNetworkHooks, causal_side_context, has_submodule, nearest_width, norm_step


class LlamaLikeBackbone(SideNetworkHooks, Backbone):
    family = "llama"
    input_keys = ("input_ids", "attention_mask")
    lora_targets = ("q_proj", "v_proj")
    ia3_targets = ("k_proj", "v_proj", "down_proj")
    ia3_feedforward = ("down_proj",)
    adapter_sites = ("self_attn.o_proj", "mlp.down_proj")
    is_causal_lm = True
    capabilities = frozenset({"decoder", "single_stack", "sublayers", "side_network"})
    # Whether the family's blocks take one mask per layer type (gemma.py); here every block gets the same one.
    per_layer_type_masks: ClassVar[bool] = False

    def __init__(self, model):
        super().__init__(model)
        sliding = "sliding_attention" in (getattr(model.config, "layer_types", None) or ())
        if sliding and not self.per_layer_type_masks:
            raise UnsupportedModel(f"{model.config.model_type} models with sliding-window layers "
                                   "(use_sliding_window) are not supported; every block here attends causally "
                                   "to the whole prefix")

    @property
    def decoder(self):
        # Accept both XForCausalLM (has .model) and the bare XModel.
        return self.model.model if hasattr(self.model, "lm_head") else self.model

    @property
    def blocks(self):
        return self.decoder.layers

    def embed(self, batch):
        ids = batch["input_ids"]                              # B×T
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        h = self.decoder.embed_tokens(ids)                    # B×T×d
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        ctx: Context = {
            "token_mask": mask,
            "position_ids": pos,
            "attn_mask": create_causal_mask(
                config=self.config, inputs_embeds=h, attention_mask=mask, past_key_values=None, position_ids=pos
            ),
            "rope": self.decoder.rotary_emb(h, position_ids=pos),  # (cos, sin), each 1×T×head_dim
        }
        return h, ctx

    def run_block(self, i, h, ctx):
        # ctx["cache"]: the KV cache of `embed_new_tokens` (decoding), read and extended by every block.
        return self.blocks[i](
            h, attention_mask=ctx["attn_mask"], position_embeddings=ctx["rope"], position_ids=ctx["position_ids"],
            past_key_values=ctx.get("cache"),
        )

    @property
    def final_norm(self):
        return self.decoder.norm

    def finish(self, h, ctx):
        return self.decoder.norm(h)

    # -- side networks (LST, QST; see side_network.py) ---------------------------------------------------
    # Rotary positions need an even head width; grouped KV heads are kept as they are. The side blocks are
    # causal and have their own rotary table at the side head width. Another side head count H' (QST's
    # exact widths only: LST's head-structured pruning maps backbone heads to side heads one to one) keeps
    # the backbone's grouping H/KV where H' allows it, else gives every side head its own KV head.
    fused_side_attention = True
    side_attention_dropout_field = "attention_dropout"
    supports_side_heads = True
    side_heads_when_rounded = False

    def side_widths(self, config, r, heads, exact):
        """d' = round(d/r), d_ff' = round(d_ff/r), head width 2·round(d_kv/(2r)) ≥ 2 (exact: d/r, ⌊d_ff/r⌋,
        d'/H', H' = `heads` or H)."""
        if exact:
            d_side = config.hidden_size // r
            H, KV = config.num_attention_heads, config.num_key_value_heads
            side_heads = heads or H
            widths = {"hidden_size": d_side, "intermediate_size": config.intermediate_size // r,
                      "head_dim": d_side // side_heads}
            if side_heads != H:          # e.g. SmolLM2 (H = 9, KV = 3): H' = 3 → 1 KV head; H' = 1 → 1
                widths["num_attention_heads"] = side_heads
                widths["num_key_value_heads"] = side_heads * KV // H if side_heads * KV % H == 0 else side_heads
            return widths
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return {"hidden_size": nearest_width(config.hidden_size, r),
                "intermediate_size": nearest_width(config.intermediate_size, r),
                "head_dim": max(2, 2 * round(head_dim / (2 * r)))}

    def side_width_problem(self, r, heads=None):
        problem = super().side_width_problem(r, heads)
        head_width = self.config.hidden_size // r // (heads or self.config.num_attention_heads)
        if problem is None and head_width % 2:
            return f"the side head width d/(r·H)={head_width} is odd; rotary positions need an even one"
        return problem

    def side_norm(self, d_side, cfg):
        return type(self.final_norm)(d_side, eps=cfg.rms_norm_eps)

    def make_side_rotary(self, cfg):
        return type(self.decoder.rotary_emb)(cfg)

    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        return causal_side_context(s, ctx, cfg, rotary, cache)

    def run_side_block(self, block, s, sctx):
        return block(s, attention_mask=sctx["mask"], position_embeddings=sctx["rope"], position_ids=sctx["pos"],
                     past_key_values=sctx["cache"])

    def embed_new_tokens(self, ids, mask, positions, cache):
        """Embedding (B×L×d) and ctx of new tokens ids (B×L) at `positions` (B×L) for cached decoding: mask
        B×(past + L) covers the cached and the new tokens, and `run_block` reads and extends `cache` (a
        transformers Cache)."""
        h = self.decoder.embed_tokens(ids)
        ctx: Context = {
            "token_mask": mask,
            "position_ids": positions,
            "attn_mask": create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=mask,
                                            past_key_values=cache, position_ids=positions),
            "rope": self.decoder.rotary_emb(h, position_ids=positions),
            "cache": cache,
        }
        return h, ctx

    @property
    def pruning_embedding(self):
        return self.decoder.embed_tokens.weight

    def pruning_plan(self, block):
        # Qwen3's q_norm / k_norm (over each head's d_kv dims) keep the within-head dims J of q and k.
        a = block.self_attn
        heads = (a.config.num_attention_heads, a.config.num_key_value_heads, a.head_dim)
        head_norms = tuple(f"self_attn.{n}" for n in ("q_norm", "k_norm") if has_submodule(a, n))
        return [norm_step(block, "input_layernorm"),
                PruneGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj", heads,
                           head_norms),
                norm_step(block, "post_attention_layernorm"),
                PruneGroup(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")]

    # -- sub-layers (for methods that couple attention and feed-forward separately, e.g. MEFT) ----------
    # Pre-norm: each sub-layer is x + branch(RMSNorm(x)), residual included, so
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    # `branch_hook(branch_input, branch_output) -> branch_output` may edit the branch (B×T×d) before the
    # residual; branch_input is the normalised RMSNorm(x).
    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        """x + SelfAttn(RMSNorm₁(x)) with the causal mask and rotary positions of ctx."""
        blk = self.blocks[i]

        def attn(n):
            return blk.self_attn(hidden_states=n, attention_mask=ctx["attn_mask"], position_ids=ctx["position_ids"],
                                 past_key_values=None, use_cache=False, position_embeddings=ctx["rope"])[0]

        return residual_sublayer(x, attn, blk.input_layernorm, "pre", branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """a + MLP(RMSNorm₂(a))."""
        blk = self.blocks[i]
        return residual_sublayer(a, blk.mlp, blk.post_attention_layernorm, "pre", branch_hook)

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    pooling = "the last real token: h[b, sum(attention_mask[b]) - 1] (B×d)"

    @classmethod
    def size_fields(cls, model_type):
        # Qwen3's head width is its own field (default 128), not d/H.
        extra = ("head_dim",) if model_type == "qwen3" else ()
        return super().size_fields(model_type) + extra

    @classmethod
    def tiny_configs(cls):
        from transformers import LlamaConfig, Qwen3Config

        from ..tokenizer import VOCAB_SIZE

        shape = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                     bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
        return {"tiny-llama": LlamaConfig(**shape),
                "tiny-qwen3": Qwen3Config(**shape, head_dim=16)}

"""Gemma 2 and Gemma 3 text decoders (Gemma Team, 2024; 2025): Llama-like blocks with Gemma's additions.

What differs from Llama (llama.py), and where it is handled:
- the token embedding is multiplied by sqrt(d) (transformers' scaled embedding module does it, so `embed`
  reads its output as it is);
- every RMSNorm scales by (1 + w) and stores w (zero at init) -- the norm modules do it; a side norm is one
  of them, and slicing w by kept dims slices (1 + w) the same way;
- four norms per block: the attention and the FFN branch are each normalised before (input_layernorm,
  pre_feedforward_layernorm) and after (post_attention_layernorm, post_feedforward_layernorm) the branch,
  and the post-norm belongs to the branch: x + PostNorm(Branch(PreNorm(x)));
- layers alternate between sliding-window and global causal attention (`config.layer_types`; each attention
  module keeps its own `layer_type`), so ctx holds one mask per layer type and each block takes its own;
- Gemma 2 soft-caps the attention logits (inside the attention module: c·tanh(a/c)) and the final logits
  (`lm_logits`: c·tanh(z/c)); Gemma 3 drops both caps and instead normalises q and k per head (q_norm, k_norm
  over d_kv), and has a local and a global rotary table (ctx["rope"][layer_type]);
- the attention scale is query_pre_attn_scalar^-1/2, not d_kv^-1/2.
Bidirectional Gemma 3 variants (`use_bidirectional_attention`, the embedding models) are refused: every
mask here is causal.
"""
from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .base import Context, UnsupportedModel, residual_sublayer
from .llama import LlamaLikeBackbone
from .side_network import PruneGroup, has_submodule, norm_step

# How each attention layer type masks: global causal, or causal within the last `sliding_window` tokens.
MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
# Model types whose rotary module holds one table per layer type (Gemma 3: local and global base frequency).
ROPE_PER_LAYER_TYPE = ("gemma3_text",)


class GemmaBackbone(LlamaLikeBackbone):
    family = "gemma"
    activation_field = "hidden_activation"
    per_layer_type_masks = True

    def __init__(self, model):
        super().__init__(model)
        if getattr(model.config, "use_bidirectional_attention", False):
            raise UnsupportedModel(f"{model.config.model_type} models with use_bidirectional_attention are not "
                                   "supported (memtune's Gemma blocks attend causally)")
        # PyTorch's fused attention has no logit soft-capping (transformers refuses it), so Gemma 2's side
        # blocks default to eager attention.
        self.fused_side_attention = model.config.attn_logit_softcapping is None

    # -- per-layer-type masks and rotary tables -------------------------------------------------------------
    def layer_types(self, config) -> tuple[str, ...]:
        """The attention types the blocks of `config` use, in a fixed order."""
        return tuple(sorted(set(config.layer_types)))

    def masks(self, config, h, mask, pos, cache=None) -> dict:
        """Layer type → additive mask 1×1×T×(past + T) (or B×...; None where none is needed), for h (B×T×·)
        and the B×(past + T) padding mask."""
        return {t: MASKS[t](config=config, inputs_embeds=h, attention_mask=mask, past_key_values=cache,
                            position_ids=pos) for t in self.layer_types(config)}

    def ropes(self, rotary, config, h, pos) -> dict:
        """Layer type → (cos, sin), each B×T×d_kv: Gemma 3's own table per type, Gemma 2's one table for both."""
        if config.model_type in ROPE_PER_LAYER_TYPE:
            return {t: rotary(h, pos, t) for t in self.layer_types(config)}
        table = rotary(h, pos)
        return {t: table for t in self.layer_types(config)}

    def _context(self, h, mask, pos, cache=None) -> Context:
        return {"token_mask": mask, "position_ids": pos,
                "attn_mask": self.masks(self.config, h, mask, pos, cache),
                "rope": self.ropes(self.decoder.rotary_emb, self.config, h, pos), "cache": cache}

    def embed(self, batch):
        ids = batch["input_ids"]                              # B×T
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        h = self.decoder.embed_tokens(ids)                    # B×T×d, already scaled by sqrt(d)
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        return h, self._context(h, mask, pos)

    def embed_new_tokens(self, ids, mask, positions, cache):
        """Embedding (B×L×d) and ctx of new tokens ids (B×L) at `positions` (B×L) for cached decoding; mask is
        B×(past + L). A transformers DynamicCache built from the config keeps the sliding layers' last
        window only, and their masks follow it."""
        h = self.decoder.embed_tokens(ids)
        return h, self._context(h, mask, positions, cache)

    @staticmethod
    def _attention_inputs(block, ctx_masks, ctx_ropes) -> dict:
        """The mask and rotary table of the block's own layer type."""
        t = block.self_attn.layer_type
        return {"attention_mask": ctx_masks[t], "position_embeddings": ctx_ropes[t]}

    def run_block(self, i, h, ctx):
        blk = self.blocks[i]
        return blk(h, position_ids=ctx["position_ids"], past_key_values=ctx.get("cache"),
                   **self._attention_inputs(blk, ctx["attn_mask"], ctx["rope"]))

    def lm_logits(self, h):
        """Finished states B×T×d → B×T×V through the frozen LM head, soft-capped as c·tanh(z/c) where the config
        has final_logit_softcapping = c (Gemma 2)."""
        logits = super().lm_logits(h)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap

    # -- side networks (LST, QST; see side_network.py) ---------------------------------------------------
    # The side blocks are Gemma blocks at side width; they keep the backbone's layer types (side_config
    # subsets `layer_types` to the kept layers), sliding window and soft-caps, and get their own rotary
    # table(s) at the side head width.
    def side_widths(self, config, r, heads, exact):
        """Llama's widths; the attention scale query_pre_attn_scalar^-1/2 follows the head width (scalar·d_kv'/d_kv),
        so the side's scores are scaled as the backbone's are relative to its head width."""
        widths = super().side_widths(config, r, heads, exact)
        ratio = widths["head_dim"] / config.head_dim
        widths["query_pre_attn_scalar"] = max(1, round(config.query_pre_attn_scalar * ratio))
        return widths

    @torch.no_grad()
    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        pos = ctx["position_ids"]
        return {"mask": self.masks(cfg, s, ctx["token_mask"], pos, cache), "rope": self.ropes(rotary, cfg, s, pos),
                "pos": pos, "cache": cache}

    def run_side_block(self, block, s, sctx):
        return block(s, position_ids=sctx["pos"], past_key_values=sctx["cache"],
                     **self._attention_inputs(block, sctx["mask"], sctx["rope"]))

    def pruning_plan(self, block):
        # Each post-norm normalises its branch's output, so it takes the rows the branch's output projection
        # kept; the pre-norms read the residual stream (the current P). Gemma 3's q_norm / k_norm keep the
        # within-head dims J of q and k.
        a = block.self_attn
        heads = (a.config.num_attention_heads, a.config.num_key_value_heads, a.head_dim)
        head_norms = tuple(f"self_attn.{n}" for n in ("q_norm", "k_norm") if has_submodule(a, n))
        return [norm_step(block, "input_layernorm"),
                PruneGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.o_proj", heads,
                           head_norms),
                norm_step(block, "post_attention_layernorm"),
                norm_step(block, "pre_feedforward_layernorm"),
                PruneGroup(("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
                norm_step(block, "post_feedforward_layernorm")]

    # -- sub-layers (MEFT): run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx) ------
    # Each sub-layer is x + PostNorm(Branch(PreNorm(x))): the branch handed to `branch_hook(PreNorm(x), u)`
    # is u = PostNorm(Branch(·)), the whole term added to the residual.
    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        """x + PostNorm₁(SelfAttn(PreNorm₁(x))) with the block's own mask and rotary table."""
        blk = self.blocks[i]
        inputs = self._attention_inputs(blk, ctx["attn_mask"], ctx["rope"])

        def attn(n):
            return blk.post_attention_layernorm(blk.self_attn(hidden_states=n, past_key_values=None, **inputs)[0])

        return residual_sublayer(x, attn, blk.input_layernorm, "pre", branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """a + PostNorm₂(MLP(PreNorm₂(a)))."""
        blk = self.blocks[i]
        return residual_sublayer(a, lambda n: blk.post_feedforward_layernorm(blk.mlp(n)),
                                 blk.pre_feedforward_layernorm, "pre", branch_hook)

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    @classmethod
    def size_fields(cls, model_type):
        # The head width is its own field (256 in Gemma 2 2B / Gemma 3 4B), not d/H.
        return ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size")

    @classmethod
    def with_depth(cls, config, blocks):
        """A copy with `blocks` blocks: the first `blocks` layer types, so the attention pattern starts as the
        full model's does."""
        layer_types = list(config.layer_types)
        config = super().with_depth(config, blocks)
        config.layer_types = [layer_types[i % len(layer_types)] for i in range(blocks)]
        return config

    @classmethod
    def tiny_configs(cls):
        from transformers import Gemma2Config, Gemma3TextConfig

        from ..tokenizer import VOCAB_SIZE

        # A 4-token window, so the sliding layers differ from the global ones in a 10-token batch; both layer
        # types twice. Gemma 2's caps (real: 50, 30) are small enough to bend these random weights' scores and
        # logits (|z| up to ~0.6), so a missing cap shows.
        shape = dict(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                     sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
                     max_position_embeddings=512, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                     tie_word_embeddings=True)
        return {"tiny-gemma2": Gemma2Config(**shape, attn_logit_softcapping=2.0, final_logit_softcapping=2.0),
                "tiny-gemma3": Gemma3TextConfig(**shape, rope_parameters={
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}})}

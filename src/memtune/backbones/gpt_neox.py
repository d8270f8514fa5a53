"""GPT-NeoX decoders (Black et al., 2022; Pythia, Biderman et al., 2023): LayerNorm blocks, rotary positions on
part of each head, an untied LM head.

Attention reads q, k, v from one fused `query_key_value` whose rows are interleaved per head: [head, (q, k, v),
d_kv], i.e. head h's q rows, then its k rows, then its v rows. The rotary table covers the first
rotary_pct·d_kv dims of each head (Pythia: 0.25). Blocks use a parallel residual where
`use_parallel_residual` is set (every Pythia size):

    parallel:    x + Drop(Attn(LN₁(x))) + Drop(MLP(LN₂(x)))
    sequential:  a = x + Drop(Attn(LN₁(x)));  a + Drop(MLP(LN₂(a)))
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from .base import Backbone, Context, UnsupportedModel, residual_sublayer
from .side_network import Fused, PruneGroup, SideNetworkHooks, causal_side_context, nearest_width, norm_step


def rotary_fraction(config) -> float:
    """The share of each head's dims that the rotary table covers (config.rotary_pct)."""
    return float(config.rope_parameters.get("partial_rotary_factor", 1.0))


class GPTNeoXBackbone(SideNetworkHooks, Backbone):
    family = "gpt_neox"
    input_keys = ("input_ids", "attention_mask")
    lora_targets = ("query_key_value",)               # fused q, k, v
    ia3_targets = ("query_key_value", "dense_4h_to_h")
    ia3_feedforward = ("dense_4h_to_h",)
    adapter_sites = ("attention.dense", "mlp.dense_4h_to_h")
    is_causal_lm = True
    dropout_field = "hidden_dropout"
    # "sublayers" only for sequential-residual blocks (added per model in __init__): a parallel block is
    # x + f(LN₁(x)) + g(LN₂(x)), not g∘f, so MEFT's two reversible sub-layers would change what it computes.
    capabilities = frozenset({"decoder", "single_stack", "side_network"})
    gaps = {"sublayers": "its blocks use a parallel residual (use_parallel_residual), x + Attn(LN₁(x)) + "
                         "MLP(LN₂(x)), not an attention sub-layer followed by a feed-forward one"}

    def __init__(self, model):
        super().__init__(model)
        if not model.config.use_parallel_residual:
            self.capabilities = self.capabilities | {"sublayers"}

    @property
    def decoder(self):
        # GPTNeoXForCausalLM.gpt_neox, or the bare GPTNeoXModel.
        return self.model.gpt_neox if hasattr(self.model, "lm_head") else self.model

    @property
    def blocks(self):
        return self.decoder.layers

    @property
    def final_norm(self):
        return self.decoder.final_layer_norm

    def embed(self, batch):
        ids = batch["input_ids"]                              # B×T
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        dec = self.decoder
        e = dec.embed_in(ids)                                 # B×T×d
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)     # 1×T
        h = dec.emb_dropout(e)
        ctx: Context = {
            "token_mask": mask,
            "position_ids": pos,
            "attn_mask": create_causal_mask(config=self.config, inputs_embeds=e, attention_mask=mask,
                                            past_key_values=None, position_ids=pos),
            "rope": dec.rotary_emb(h, position_ids=pos),      # (cos, sin), each 1×T×rotary width
        }
        return h, ctx

    def run_block(self, i, h, ctx):
        return self.blocks[i](h, attention_mask=ctx["attn_mask"], position_ids=ctx["position_ids"],
                              position_embeddings=ctx["rope"], layer_past=ctx.get("cache"))

    def finish(self, h, ctx):
        return self.decoder.final_layer_norm(h)

    # -- side networks (LST, QST; see side_network.py) ---------------------------------------------------
    # GPTNeoXAttention derives its head width from d / H, so a side width is a multiple of H; the side blocks
    # have their own rotary table at the side head width (the same rotary_pct).
    fused_side_attention = True
    side_dropout_fields = ("hidden_dropout",)
    side_attention_dropout_field = "attention_dropout"

    def side_widths(self, config, r, heads, exact):
        """d' = H·round(d_kv/r), d_ff' = round(d_ff/r); exact: d/r, ⌊d_ff/r⌋."""
        H = config.num_attention_heads
        if exact:
            return {"hidden_size": config.hidden_size // r, "intermediate_size": config.intermediate_size // r}
        return {"hidden_size": H * nearest_width(config.hidden_size, r * H),
                "intermediate_size": nearest_width(config.intermediate_size, r)}

    def side_width_problem(self, r, heads=None):
        problem = super().side_width_problem(r, heads)
        if problem is None:
            head_width = self.config.hidden_size // r // self.config.num_attention_heads
            rotary = int(head_width * rotary_fraction(self.config))
            if rotary % 2:
                return (f"the side head width d/(r·H)={head_width} has {rotary} rotary dims (rotary_pct "
                        f"{rotary_fraction(self.config)}); rotary positions need an even number")
        return problem

    def side_norm(self, d_side, cfg):
        return nn.LayerNorm(d_side, eps=cfg.layer_norm_eps)

    def make_side_rotary(self, cfg):
        return type(self.decoder.rotary_emb)(cfg)

    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        return causal_side_context(s, ctx, cfg, rotary, cache)

    def run_side_block(self, block, s, sctx):
        return block(s, attention_mask=sctx["mask"], position_ids=sctx["pos"], position_embeddings=sctx["rope"],
                     layer_past=sctx["cache"])

    @property
    def pruning_embedding(self):
        return self.decoder.embed_in.weight

    def pruning_plan(self, block):
        # query_key_value: H groups of (q, k, v) parts, d_kv rows each; rows are ranked over all H·d_kv (as for
        # BERT-like attention), not in rotary pairs. The chain is the sequential one for both residual forms:
        # with a parallel residual LN₂ reads the block input, whose dims the chain has already replaced by
        # dense's kept rows (an initialisation, as everywhere in the chain: docs/methods/lst.md §8).
        attn = PruneGroup((Fused("attention.query_key_value", (1, 1, 1), groups=self.config.num_attention_heads),),
                          "attention.dense")
        return [norm_step(block, "input_layernorm"), attn, norm_step(block, "post_attention_layernorm"),
                PruneGroup(("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h")]

    # -- sub-layers (MEFT; sequential-residual blocks only, see `capabilities`) --------------------------
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    # Pre-LN: x + Drop(branch(LN(x))); branch_hook(LN(x), branch) sees the branch after its dropout.
    def _sequential(self, i):
        blk = self.blocks[i]
        if blk.use_parallel_residual:
            raise UnsupportedModel("gpt_neox blocks with use_parallel_residual=True have no sequential sub-layers "
                                   "(x + attn(LN₁(x)) + mlp(LN₂(x)))")
        return blk

    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        blk = self._sequential(i)

        def attn(n):
            u = blk.attention(n, attention_mask=ctx["attn_mask"], position_ids=ctx["position_ids"],
                              position_embeddings=ctx["rope"])[0]
            return blk.post_attention_dropout(u)

        return residual_sublayer(x, attn, blk.input_layernorm, "pre", branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        blk = self._sequential(i)
        return residual_sublayer(a, lambda n: blk.post_mlp_dropout(blk.mlp(n)), blk.post_attention_layernorm,
                                 "pre", branch_hook)

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    pooling = "the last real token: h[b, sum(attention_mask[b]) - 1] (B×d)"

    @classmethod
    def tiny_configs(cls):
        from transformers import GPTNeoXConfig

        from ..tokenizer import VOCAB_SIZE

        # Pythia's form: parallel residual, rotary on a quarter of each 16-dim head (4 dims). The LM head is
        # tied, as in the other tiny decoders (Pythia unties it; see tiny-phi3).
        return {"tiny-gpt-neox": GPTNeoXConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=4, num_attention_heads=4, rotary_pct=0.25,
                                               rotary_emb_base=10000, max_position_embeddings=512,
                                               use_parallel_residual=True, pad_token_id=0, bos_token_id=2,
                                               eos_token_id=3, tie_word_embeddings=True)}

"""GPT-2 decoders (Radford et al., 2019): learned absolute positions, pre-LN blocks, a tied LM head.

The projections are transformers' `Conv1D` (a linear layer storing its weight as in×out), and attention's
q, k, v come from one fused `c_attn` (d → 3d, rows [q | k | v]; LST prunes it part by part). Config names
differ from the others (n_embd, n_layer, n_head, n_inner, n_positions); `hidden_size`, `num_hidden_layers`,
`num_attention_heads` are aliases of them.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

from .base import Backbone, Context, residual_sublayer
from .side_network import Fused, PruneGroup, SideNetworkHooks, causal_side_context, nearest_width, norm_step


class GPT2Backbone(SideNetworkHooks, Backbone):
    family = "gpt2"
    input_keys = ("input_ids", "attention_mask")
    lora_targets = ("c_attn",)                       # fused q, k, v (peft wraps Conv1D with fan_in_fan_out)
    # Dotted suffixes: "c_proj" alone names both attn.c_proj and mlp.c_proj.
    ia3_targets = ("attn.c_attn", "mlp.c_proj")
    ia3_feedforward = ("mlp.c_proj",)
    adapter_sites = ("attn.c_proj", "mlp.c_proj")
    is_causal_lm = True
    dropout_field = "resid_pdrop"
    activation_field = "activation_function"
    capabilities = frozenset({"decoder", "single_stack", "sublayers", "side_network"})

    @property
    def transformer(self):
        # GPT2LMHeadModel.transformer, or the bare GPT2Model itself.
        return self.model.transformer if hasattr(self.model, "lm_head") else self.model

    @property
    def blocks(self):
        return self.transformer.h

    @property
    def final_norm(self):
        return self.transformer.ln_f

    def embed(self, batch):
        ids = batch["input_ids"]                                  # B×T
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        tr = self.transformer
        e = tr.wte(ids)                                           # B×T×d
        # GPT2Model numbers positions 0..T-1 whatever the padding (right padding leaves real tokens in place).
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)     # 1×T
        h = e + tr.wpe(pos)
        ctx: Context = {
            "token_mask": mask,
            "position_ids": pos,
            "attn_mask": create_causal_mask(config=self.config, inputs_embeds=e, attention_mask=mask,
                                            past_key_values=None, position_ids=pos),
        }
        return tr.drop(h), ctx                                    # embedding dropout (embd_pdrop)

    def run_block(self, i, h, ctx):
        return self.blocks[i](h, None, ctx["attn_mask"], position_ids=ctx["position_ids"])

    def finish(self, h, ctx):
        return self.transformer.ln_f(h)

    # -- side networks (LST, QST; see side_network.py) ---------------------------------------------------
    # GPT2Attention derives its head width from n_embd / H, so a side width is a multiple of H; positions are
    # learned and added at the embedding, so the side blocks need only the causal mask (as OPT's).
    fused_side_attention = True
    side_dropout_fields = ("resid_pdrop",)
    side_attention_dropout_field = "attn_pdrop"

    def side_widths(self, config, r, heads, exact):
        """d' = H·round(d_kv/r), d_ff' = round(d_ff/r) (d_ff = n_inner, or 4d where it is None); exact: d/r,
        ⌊d_ff/r⌋."""
        H, inner = config.n_head, config.n_inner or 4 * config.n_embd
        if exact:
            return {"n_embd": config.n_embd // r, "n_inner": inner // r}
        return {"n_embd": H * nearest_width(config.n_embd, r * H), "n_inner": nearest_width(inner, r)}

    def side_norm(self, d_side, cfg):
        return nn.LayerNorm(d_side, eps=cfg.layer_norm_epsilon)

    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        return causal_side_context(s, ctx, cfg, rotary, cache)

    def run_side_block(self, block, s, sctx):
        return block(s, sctx["cache"], sctx["mask"], position_ids=sctx["pos"])

    @property
    def pruning_embedding(self):
        return self.transformer.wte.weight

    def pruning_plan(self, block):
        # c_attn's 3d' rows are [q | k | v]; c_fc and c_proj are Conv1D too (the pruner reads them in×out).
        return [norm_step(block, "ln_1"), PruneGroup((Fused("attn.c_attn", (1, 1, 1)),), "attn.c_proj"),
                norm_step(block, "ln_2"), PruneGroup(("mlp.c_fc",), "mlp.c_proj")]

    # -- sub-layers (MEFT): run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx) ------
    # Pre-LN: x + branch(LN(x)); the branch modules end in their own dropout (attn.resid_dropout,
    # mlp.dropout), so branch_hook(LN(x), branch) sees the branch after its dropout.
    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        blk = self.blocks[i]

        def attn(n):
            return blk.attn(n, attention_mask=ctx["attn_mask"], position_ids=ctx["position_ids"])[0]

        return residual_sublayer(x, attn, blk.ln_1, "pre", branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        blk = self.blocks[i]
        return residual_sublayer(a, blk.mlp, blk.ln_2, "pre", branch_hook)

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    depth_fields = ("n_layer",)
    pooling = "the last real token: h[b, sum(attention_mask[b]) - 1] (B×n_embd)"

    @classmethod
    def size_fields(cls, model_type):
        return ("vocab_size", "n_embd", "n_layer", "n_head")

    @classmethod
    def max_positions(cls, config):
        """Learned absolute positions 0..n_positions - 1."""
        return int(config.n_positions)

    @classmethod
    def tiny_configs(cls):
        from transformers import GPT2Config

        from ..tokenizer import VOCAB_SIZE

        return {"tiny-gpt2": GPT2Config(vocab_size=VOCAB_SIZE, n_embd=64, n_layer=4, n_head=4, n_inner=128,
                                        n_positions=512, pad_token_id=0, bos_token_id=2, eos_token_id=3)}

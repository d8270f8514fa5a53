"""OPT decoders (Zhang et al., 2022): learned absolute positions, LayerNorm blocks, a tied LM head.

Most sizes normalise before each sub-layer (`do_layer_norm_before`); OPT-350m normalises after it and maps
between a 512-wide embedding and the 1024-wide blocks (`project_in` / `project_out`). Both forms are handled:
the blocks' width is `hidden_size`, the finished states (and the LM head's input) are `word_embed_proj_dim` wide.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.masking_utils import create_causal_mask

from .base import Backbone, Context, residual_sublayer
from .side_network import PruneGroup, SideNetworkHooks, nearest_width, norm_step


class OPTBackbone(SideNetworkHooks, Backbone):
    family = "opt"
    dropout_field = "dropout"
    activation_field = "activation_function"
    input_keys = ("input_ids", "attention_mask")
    lora_targets = ("q_proj", "v_proj")
    ia3_targets = ("k_proj", "v_proj", "fc2")
    ia3_feedforward = ("fc2",)
    adapter_sites = ("self_attn.out_proj", "fc2")
    is_causal_lm = True
    capabilities = frozenset({"decoder", "single_stack", "sublayers", "side_network"})

    def __init__(self, model):
        super().__init__(model)
        self.norm_position = "pre" if model.config.do_layer_norm_before else "post"
        if model.config.word_embed_proj_dim != model.config.hidden_size:
            # A side network reads and writes the block width; OPT-350m's 512-wide embedding and LM head
            # sit on the other side of project_in / project_out.
            self.capabilities = self.capabilities - {"side_network"}
            self.gaps = {"side_network": f"its embedding and LM head are {model.config.word_embed_proj_dim} wide "
                                         f"(project_in / project_out), not the blocks' {model.config.hidden_size}"}

    @property
    def decoder(self):
        # OPTForCausalLM.model.decoder, or the bare OPTModel's .decoder.
        return self.model.model.decoder if hasattr(self.model, "lm_head") else self.model.decoder

    @property
    def blocks(self):
        return self.decoder.layers

    @property
    def feature_size(self):
        return self.config.word_embed_proj_dim

    @property
    def final_norm(self):
        return self.decoder.final_layer_norm

    def embed(self, batch):
        ids = batch["input_ids"]                                  # B×T
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        dec = self.decoder
        e = dec.embed_tokens(ids)                                 # B×T×word_embed_proj_dim
        # Positions count real tokens only (left padding starts at 0), as OPTDecoder does.
        pos = (torch.cumsum(mask, dim=1) * mask - 1).long()       # B×T
        h = (e if dec.project_in is None else dec.project_in(e)) + dec.embed_positions(mask, 0, position_ids=pos)
        ctx: Context = {
            "token_mask": mask,
            "position_ids": pos,
            "attn_mask": create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=mask,
                                            past_key_values=None),
        }
        return h, ctx                                            # h: B×T×d (OPTDecoder adds no embedding dropout)

    def run_block(self, i, h, ctx):
        return self.blocks[i](h, attention_mask=ctx["attn_mask"], position_ids=ctx["position_ids"])

    def finish(self, h, ctx):
        dec = self.decoder
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        return h if dec.project_out is None else dec.project_out(h)

    # -- side networks (LST, QST; see side_network.py) ---------------------------------------------------
    # OPTAttention derives its head width from hidden_size / H (as BERT does), so a side width is a multiple of
    # H; positions are learned and added at the embedding, so the side blocks need only the causal mask.
    fused_side_attention = True
    side_dropout_fields = ("dropout",)
    side_attention_dropout_field = "attention_dropout"

    def side_widths(self, config, r, heads, exact):
        """d' = H·round(d_kv/r), d_ff' = round(d_ff/r); exact: d/r, ⌊d_ff/r⌋."""
        H = config.num_attention_heads
        if exact:
            return {"hidden_size": config.hidden_size // r, "ffn_dim": config.ffn_dim // r,
                    "word_embed_proj_dim": config.hidden_size // r}
        d_side = H * nearest_width(config.hidden_size, r * H)
        return {"hidden_size": d_side, "ffn_dim": nearest_width(config.ffn_dim, r), "word_embed_proj_dim": d_side}

    def side_norm(self, d_side, cfg):
        # Pre-LN stacks end in a final LayerNorm; post-LN blocks end in one each (then the side has none).
        if self.final_norm is None:
            return nn.Identity()
        return nn.LayerNorm(d_side, elementwise_affine=cfg.layer_norm_elementwise_affine)

    @torch.no_grad()
    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        return {"mask": create_causal_mask(config=cfg, inputs_embeds=s, attention_mask=ctx["token_mask"],
                                           past_key_values=cache),
                "pos": ctx["position_ids"], "cache": cache}

    def run_side_block(self, block, s, sctx):
        return block(s, attention_mask=sctx["mask"], position_ids=sctx["pos"], past_key_values=sctx["cache"])

    @property
    def pruning_embedding(self):
        return self.decoder.embed_tokens.weight

    def pruning_plan(self, block):
        attn = PruneGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.out_proj")
        ffn = PruneGroup(("fc1",), "fc2")
        attn_norm, ffn_norm = norm_step(block, "self_attn_layer_norm"), norm_step(block, "final_layer_norm")
        if self.norm_position == "pre":           # each norm reads the residual stream before its sub-layer
            return [attn_norm, attn, ffn_norm, ffn]
        return [attn, attn_norm, ffn, ffn_norm]   # post-LN: each norm takes its sub-layer's new P

    # -- sub-layers (for methods that couple attention and feed-forward separately, e.g. MEFT) ----------
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    # Pre-LN: x + branch(LN(x)), branch_input = LN(x); post-LN (OPT-350m): LN(x + branch(x)), branch_input = x.
    # `branch_hook(branch_input, branch_output) -> branch_output` edits the branch (B×T×d) after its dropout.
    def _sublayer(self, x, norm, branch, dropout, training, branch_hook):
        return residual_sublayer(x, lambda n: F.dropout(branch(n), p=dropout, training=training), norm,
                                 self.norm_position, branch_hook)

    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        blk = self.blocks[i]

        def attn(n):
            return blk.self_attn(hidden_states=n, attention_mask=ctx["attn_mask"], position_ids=ctx["position_ids"])[0]

        return self._sublayer(x, blk.self_attn_layer_norm, attn, blk.dropout, blk.training, branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        blk = self.blocks[i]
        return self._sublayer(a, blk.final_layer_norm, lambda n: blk.fc2(blk.activation_fn(blk.fc1(n))),
                              blk.dropout, blk.training, branch_hook)

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    pooling = "the last real token: h[b, sum(attention_mask[b]) - 1] (B×word_embed_proj_dim)"

    @classmethod
    def size_fields(cls, model_type):
        return ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim")

    @classmethod
    def max_positions(cls, config):
        """Learned absolute positions 0..max_position_embeddings - 1 (stored with an offset of 2)."""
        return int(config.max_position_embeddings)

    @classmethod
    def tiny_configs(cls):
        from transformers import OPTConfig

        from ..tokenizer import VOCAB_SIZE

        return {"tiny-opt": OPTConfig(vocab_size=VOCAB_SIZE, hidden_size=64, ffn_dim=128, num_hidden_layers=4,
                                      num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=3)}

"""Llama-like decoders (Llama, SmolLM2, Mistral, Qwen2): causal self-attention with rotary positions."""
from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask

from .base import Backbone, Context


class LlamaLikeBackbone(Backbone):
    family = "llama"
    input_keys = ("input_ids", "attention_mask")
    lora_targets = ("q_proj", "v_proj")
    ia3_targets = ("k_proj", "v_proj", "down_proj")
    ia3_feedforward = ("down_proj",)
    adapter_sites = ("self_attn.o_proj", "mlp.down_proj")
    is_causal_lm = True

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
        return self.blocks[i](
            h, attention_mask=ctx["attn_mask"], position_embeddings=ctx["rope"], position_ids=ctx["position_ids"]
        )

    def finish(self, h, ctx):
        return self.decoder.norm(h)

    def pool(self, h, ctx):
        """Classification on a decoder reads the last real token (right padding assumed)."""
        last = ctx["token_mask"].sum(1).long() - 1           # B
        return h[torch.arange(h.shape[0], device=h.device), last]

    def lm_logits(self, h):
        if not hasattr(self.model, "lm_head"):
            return super().lm_logits(h)
        return self.model.lm_head(h)                           # B×T×V

    # -- sub-layers (for methods that couple attention and feed-forward separately, e.g. MEFT) ----------
    # Pre-norm: each sub-layer is x + branch(RMSNorm(x)), residual included, so
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    # `branch_hook(branch_input, branch_output) -> branch_output` may edit the branch (B×T×d) before the
    # residual; branch_input is the normalised RMSNorm(x).
    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        """x + SelfAttn(RMSNorm₁(x)) with the causal mask and rotary positions of ctx."""
        blk = self.blocks[i]
        n = blk.input_layernorm(x)
        u, _ = blk.self_attn(hidden_states=n, attention_mask=ctx["attn_mask"], position_ids=ctx["position_ids"],
                             past_key_values=None, use_cache=False, position_embeddings=ctx["rope"])
        if branch_hook is not None:
            u = branch_hook(n, u)
        return x + u

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """a + MLP(RMSNorm₂(a))."""
        blk = self.blocks[i]
        n = blk.post_attention_layernorm(a)
        u = blk.mlp(n)
        if branch_hook is not None:
            u = branch_hook(n, u)
        return a + u

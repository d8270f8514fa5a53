"""ModernBERT encoders (ModernBertModel; Warner et al., 2024): a pre-norm BERT with rotary positions.

Each block is x + Attn(LN_attn(x)), then + GeGLU(LN_mlp(x)), with no biases by default (attention_bias,
mlp_bias, norm_bias). Block 0 has no attention norm (the embedding is already normalised: tok_embeddings →
LayerNorm → dropout), and the stack ends in a final LayerNorm. Attention alternates: every
`global_attn_every_n_layers`-th block (0, n, 2n, ...) attends to the whole sequence with rotary base
`global_rope_theta`; the others attend within |i − j| ≤ local_attention / 2 with base `local_rope_theta`.
`config.layer_types` names each block's kind ("full_attention" / "sliding_attention"), and the blocks read
the mask and the rotary table of their kind.

Transformers 5 runs ModernBERT on padded B×T batches whatever the attention kernel (the unpadded varlen path
of flash attention is gone); the sliding window is a B×1×T×T mask like the padding, so eager (the tiny models)
and SDPA (what `load_model` leaves for real checkpoints, transformers' default) compute the same function.

Pooling follows ModernBertForSequenceClassification: `config.classifier_pooling` "cls" (h[:, 0]) or "mean"
(over real tokens). Its dense → act → LayerNorm classifier head is not part of ModernBertModel and is not
used; memtune's own head reads the pooled states.
"""
from __future__ import annotations

import copy

import torch
from transformers.masking_utils import create_bidirectional_mask, create_bidirectional_sliding_window_mask

from torch import nn

from .base import Backbone, Context, residual_sublayer
from .side_network import Fused, PruneGroup, SideNetworkHooks, build_block, nearest_width, norm_step


class ModernBertBackbone(SideNetworkHooks, Backbone):
    family = "modernbert"
    dropout_field = "mlp_dropout"
    activation_field = "hidden_activation"
    input_keys = ("input_ids", "attention_mask")
    # q, k and v are one fused projection Wqkv (d → 3d: q, k, v stacked), so LoRA adapts all three together
    # and IA3 rescales q as well as k and v (3d values instead of 2d); the GeGLU's fused Wi (d → 2·d_ff: input
    # and gate halves) feeds Wo, whose input IA3 rescales.
    lora_targets = ("Wqkv",)
    ia3_targets = ("Wqkv", "mlp.Wo")
    ia3_feedforward = ("mlp.Wo",)
    adapter_sites = ("attn.Wo", "mlp.Wo")
    capabilities = frozenset({"encoder", "single_stack", "sublayers", "side_network"})

    @property
    def blocks(self):
        return self.model.layers

    def embed(self, batch):
        ids = batch["input_ids"]                              # B×T
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        h = self.model.embeddings(input_ids=ids)              # LN(tok_embeddings(ids)), dropout: B×T×d
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)    # 1×T (no absolute positions)
        kinds = set(self.config.layer_types)
        ctx: Context = {
            "token_mask": mask,
            # Per attention kind: the padding mask (full) or padding ∧ |i − j| ≤ local_attention/2 (sliding),
            # in the kernel's form (B×1×T×T additive for eager; SDPA's boolean form or None).
            "attn_masks": {
                "full_attention": create_bidirectional_mask(config=self.config, inputs_embeds=h,
                                                            attention_mask=mask),
                "sliding_attention": create_bidirectional_sliding_window_mask(config=self.config,
                                                                              inputs_embeds=h,
                                                                              attention_mask=mask),
            },
            # (cos, sin), each 1×T×head_dim, at the kind's rotary base (global or local theta).
            "rope": {kind: self.model.rotary_emb(h, pos, kind) for kind in kinds},
        }
        return h, ctx

    def _attention_inputs(self, i, ctx):
        """The mask and the rotary table block i reads (by its attention kind)."""
        kind = self.blocks[i].attention_type
        return ctx["attn_masks"][kind], ctx["rope"][kind]

    def run_block(self, i, h, ctx):
        mask, rope = self._attention_inputs(i, ctx)
        return self.blocks[i](h, attention_mask=mask, position_embeddings=rope)

    @property
    def final_norm(self):
        return self.model.final_norm

    def finish(self, h, ctx):
        return self.model.final_norm(h)

    def pool(self, h, ctx):
        """ModernBertForSequenceClassification's pooling: h[:, 0] ("cls") or the mean over real tokens."""
        if self.config.classifier_pooling == "cls":
            return h[:, 0]                                    # B×d
        return super().pool(h, ctx)

    # -- sub-layers (for methods that couple attention and feed-forward separately, e.g. MEFT) ----------
    # Pre-LN: each sub-layer is x + branch(LN(x)), residual included (block 0's attention norm is the
    # identity), so
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    # `branch_hook(branch_input, branch_output) -> branch_output` may edit the branch (B×T×d) before the
    # residual; branch_input is the normalised LN(x).
    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        """x + Dropout(W_o·SelfAttn(LN_attn(x))) with rotary positions and the block's (sliding) mask."""
        blk = self.blocks[i]
        mask, rope = self._attention_inputs(i, ctx)
        return residual_sublayer(x, lambda n: blk.attn(n, position_embeddings=rope, attention_mask=mask)[0],
                                 blk.attn_norm, "pre", branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """a + W_o·Dropout(act(input) ⊙ gate), [input ‖ gate] = W_i·LN_mlp(a) (GeGLU)."""
        blk = self.blocks[i]
        return residual_sublayer(a, blk.mlp, blk.mlp_norm, "pre", branch_hook)

    # -- side networks (LST, QST; see side_network.py) ---------------------------------------------------
    # The side blocks are ModernBERT blocks at width d' = H·d_kv' (the attention class derives d_kv from d/H;
    # rotary positions need an even d_kv'), each of the attention kind of the layer it mirrors, with their own
    # rotary tables (global and local theta) at the side head width. The fused Wqkv (q | k | v) and Wi
    # (input | gate) are pruned part by part with the same kept rows (side_network.Fused).
    fused_side_attention = True
    side_dropout_fields = ("mlp_dropout",)
    side_attention_dropout_field = "attention_dropout"

    def side_widths(self, config, r, heads, exact):
        """d' = H·d_kv' with d_kv' = 2·round(d_kv/(2r)) ≥ 2, d_ff' = round(d_ff/r) (exact: d/r, ⌊d_ff/r⌋)."""
        if exact:
            return {"hidden_size": config.hidden_size // r, "intermediate_size": config.intermediate_size // r}
        H = config.num_attention_heads
        head_dim = max(2, 2 * round(config.hidden_size // H / (2 * r)))
        return {"hidden_size": H * head_dim, "intermediate_size": nearest_width(config.intermediate_size, r)}

    def side_width_problem(self, r, heads=None):
        problem = super().side_width_problem(r, heads)
        head_width = self.config.hidden_size // r // self.config.num_attention_heads
        if problem is None and head_width % 2:
            return f"the side head width d/(r·H)={head_width} is odd; rotary positions need an even one"
        return problem

    def side_config(self, stack_config, r, keep=None, **options):
        c = super().side_config(stack_config, r, keep=keep, **options)
        c.side_mirrors = tuple(range(stack_config.num_hidden_layers)) if keep is None else tuple(keep)
        return c

    def make_side_block(self, cfg, index, decoder=False):
        """A ModernBERT block at the side config whose attention norm is there exactly when the mirrored layer
        has one (only layer 0 reads the already normalised embedding without it)."""
        block = build_block(type(self.blocks[0]), cfg, index)
        if cfg.side_mirrors[index] == 0:
            block.attn_norm = nn.Identity()
        elif isinstance(block.attn_norm, nn.Identity):
            block.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)
        return block

    def side_norm(self, d_side, cfg):
        return nn.LayerNorm(d_side, eps=cfg.norm_eps, bias=cfg.norm_bias)

    def make_side_rotary(self, cfg):
        return type(self.model.rotary_emb)(cfg)

    @torch.no_grad()
    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        pos = torch.arange(s.shape[1], device=s.device).unsqueeze(0)
        mask = ctx["token_mask"]
        return {"masks": {"full_attention": create_bidirectional_mask(config=cfg, inputs_embeds=s, attention_mask=mask),
                          "sliding_attention": create_bidirectional_sliding_window_mask(
                              config=cfg, inputs_embeds=s, attention_mask=mask)},
                "rope": {kind: rotary(s, pos, kind) for kind in set(cfg.layer_types)}}

    def run_side_block(self, block, s, sctx):
        kind = block.attention_type
        return block(s, attention_mask=sctx["masks"][kind], position_embeddings=sctx["rope"][kind])

    @property
    def pruning_embedding(self):
        return self.model.embeddings.tok_embeddings.weight

    def pruning_plan(self, block):
        H = self.config.num_attention_heads
        return [norm_step(block, "attn_norm"),
                PruneGroup((Fused("attn.Wqkv", (1, 1, 1)),), "attn.Wo", (H, H, self.config.hidden_size // H)),
                norm_step(block, "mlp_norm"),
                PruneGroup((Fused("mlp.Wi", (1, 1)),), "mlp.Wo")]

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    pooling = ("config.classifier_pooling, as ModernBertForSequenceClassification: 'cls' → h[:, 0], "
               "'mean' → mean over tokens where attention_mask is 1 (B×d)")

    @classmethod
    def with_depth(cls, config, blocks):
        """A copy with `blocks` blocks whose attention kinds continue the config's global/local pattern
        (layer_types is one entry per block)."""
        config = copy.deepcopy(config)
        kinds = list(config.layer_types)
        period = next(p for p in range(1, len(kinds) + 1)
                      if all(k == kinds[j % p] for j, k in enumerate(kinds)))
        config.num_hidden_layers = blocks
        config.layer_types = [kinds[j % period] for j in range(blocks)]
        return config

    @classmethod
    def tiny_configs(cls):
        from transformers import ModernBertConfig

        from ..tokenizer import VOCAB_SIZE

        # A 4-token local window and global attention every 2nd block: the 10-token test batches see both
        # kinds, and the window really cuts (|i − j| ≤ 2). Unlike the released checkpoints (no biases), the
        # tiny model has attention and MLP biases, so that BitFit has something to train; the norms keep
        # none, so both paths are exercised.
        return {"tiny-modernbert": ModernBertConfig(
            vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=512, local_attention=4, global_attn_every_n_layers=2,
            attention_bias=True, mlp_bias=True, pad_token_id=0, bos_token_id=2, eos_token_id=3,
            cls_token_id=2, sep_token_id=3)}

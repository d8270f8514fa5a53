"""DeBERTa-v2 and DeBERTa-v3 encoders (DebertaV2Model; both are `model_type` "deberta-v2").

Post-LN blocks like BERT's whose self-attention is disentangled (He et al., 2021): besides the content-to-content
scores q·kᵀ, each head adds content-to-position ("c2p": the query against the key projection of the relative
distance's embedding) and position-to-content ("p2c": the key against the query projection of the reversed
distance's embedding) terms. The distances come from one table shared by every block, `encoder.rel_embeddings`
(2·k × d, k = position_buckets, or max_relative_positions without buckets), normalised by `encoder.LayerNorm`
when `norm_rel_ebd` says "layer_norm"; with buckets, distances of |δ| ≥ k/2 share log-spaced buckets. DeBERTa-v3
has no absolute positions (position_biased_input false), no token types, and projects the table with the
content projections themselves (share_att_key true). DeBERTa-v2 xlarge/xxlarge add a convolution next to
block 0 (conv_kernel_size), which `run_block` applies as DebertaV2Encoder does.

The shared table, its LayerNorm and the bucketed T×T distance matrix are computed once per batch in `embed`
and passed to every block through ctx (the blocks apply their own dropout to the table, as in HF).
"""
from __future__ import annotations

import torch

from .base import Backbone, Context, UnsupportedModel, residual_sublayer


class DebertaV2Backbone(Backbone):
    family = "deberta-v2"
    input_keys = ("input_ids", "attention_mask", "token_type_ids")
    lora_targets = ("query_proj", "value_proj")
    # Dotted suffix "output.dense" names both the attention output (attention.output.dense) and the FFN output
    # (output.dense), as for BERT.
    ia3_targets = ("key_proj", "value_proj", "output.dense")
    ia3_feedforward = ("output.dense",)
    adapter_sites = ("attention.output.dense", "output.dense")
    norm_position = "post"
    # No "side_network": side blocks at width d' project the distance table with their own d'-wide projections,
    # so they need a trainable table of their own (2k × d' and its LayerNorm) shared by all side blocks, as
    # the backbone's lives in the encoder, outside the blocks. The side-network hooks (side_network.py) have
    # no place for a trainable per-stack module: the one make_side_rotary returns sits outside the side
    # network (LST/QST neither cast it with the side blocks nor count it in the side's trainable set), and a
    # copy per side block would change the architecture; it needs a hook there.
    capabilities = frozenset({"encoder", "single_stack", "sublayers"})

    def __init__(self, model):
        super().__init__(model)
        if self.encoder.conv is not None:
            # The convolution mixes block 0's input into its output after the FFN's LayerNorm, so block 0 is
            # not the composition of two residual sub-layers.
            self.capabilities = type(self).capabilities - {"sublayers"}

    @property
    def encoder(self):
        return self.model.encoder

    @property
    def blocks(self):
        return self.encoder.layer

    def embed(self, batch):
        ids = batch["input_ids"]                              # B×T
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        # word (+ absolute positions, + token types where the config has them), LayerNorm, padded rows zeroed
        # (`mask`), dropout: B×T×d
        h = self.model.embeddings(input_ids=ids, token_type_ids=batch.get("token_type_ids"), mask=mask)
        ctx: Context = {
            "token_mask": mask,
            # B×1×T×T, 1 where query and key are both real: padded queries attend nowhere (their rows of the
            # softmax are uniform over the -inf-filled scores and never read by real tokens).
            "attn_mask": self.encoder.get_attention_mask(mask),
            # 1×T×T bucketed relative distances i - j (None without relative attention)
            "relative_pos": self.encoder.get_rel_pos(h),
            # 2k×d shared distance table after its LayerNorm (None without relative attention)
            "rel_embeddings": self.encoder.get_rel_embedding(),
        }
        return h, ctx

    def _attention_kwargs(self, ctx):
        return {"relative_pos": ctx["relative_pos"], "rel_embeddings": ctx["rel_embeddings"]}

    def run_block(self, i, h, ctx):
        out = self.blocks[i](h, ctx["attn_mask"], **self._attention_kwargs(ctx))[0]
        if i == 0 and self.encoder.conv is not None:
            # LN(out + act(conv(h))) on real rows, zero on padded ones (DeBERTa-v2 xlarge/xxlarge)
            out = self.encoder.conv(h, out, ctx["token_mask"])
        return out

    # Pooling: the protocol's default mean over real tokens (B×d), as for BERT. DebertaV2Model carries no
    # pooler; HF's ContextPooler (first token → dense → activation) belongs to the classification model and
    # is new there, so here it would be a frozen random layer in the backbone.

    # -- sub-layers (for methods that couple attention and feed-forward separately, e.g. MEFT) ----------
    # Post-LN: each sub-layer is LN(x + branch(x)), residual and LayerNorm included, so
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    # `branch_hook(branch_input, branch_output) -> branch_output` may edit the branch (B×T×d) after its
    # dropout and before the residual + LayerNorm; branch_input is the sub-layer input x itself.
    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        """a = LN₁(x + Dropout(W_o·DisentangledAttn(x))): B×T×d → B×T×d."""
        self._check_sublayers()
        attn = self.blocks[i].attention
        out = attn.output

        def branch(n):
            # the disentangled attention (dropout on the distance table and the probabilities inside): B×T×d
            context = attn.self(n, ctx["attn_mask"], **self._attention_kwargs(ctx))[0]
            return out.dropout(out.dense(context))

        return residual_sublayer(x, branch, out.LayerNorm, "post", branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """out = LN₂(a + Dropout(W_2·act(W_1·a))): B×T×d → B×T×d."""
        self._check_sublayers()
        blk = self.blocks[i]
        out = blk.output
        return residual_sublayer(a, lambda n: out.dropout(out.dense(blk.intermediate(n))), out.LayerNorm,
                                 "post", branch_hook)

    def _check_sublayers(self):
        if "sublayers" not in self.capabilities:
            raise UnsupportedModel("deberta-v2 models with a convolution next to block 0 (conv_kernel_size > 0) "
                                   "have no residual sub-layers")

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    @classmethod
    def max_positions(cls, config):
        """Learned absolute positions only where position_biased_input (DeBERTa-v3 has none: relative
        distances beyond the buckets share the outermost log buckets, so any length runs)."""
        if getattr(config, "position_biased_input", True):
            return int(config.max_position_embeddings)
        return None

    @classmethod
    def planning_batch(cls, config, batch_size, max_length, image_size=None, target_length=1,
                       dtype=torch.float32, device="meta"):
        batch = super().planning_batch(config, batch_size, max_length, device=device)
        if getattr(config, "type_vocab_size", 0):
            batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])      # DeBERTa-v2 tokenizers give them
        return batch

    @classmethod
    def tiny_configs(cls):
        from transformers import DebertaV2Config

        from ..tokenizer import VOCAB_SIZE

        # DeBERTa-v3's layout at d = 64: relative attention with both terms, a shared LayerNorm'd table
        # projected by the content projections, no absolute positions or token types. 16 buckets: distances
        # |δ| < 8 exact, longer ones in log-spaced buckets up to 64 (δ = ±8, ±9 keep their own bucket, so
        # 10-token rows see 2·10 - 1 distinct distances).
        return {"tiny-deberta-v2": DebertaV2Config(
            vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=512, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
            max_relative_positions=64, position_biased_input=False, share_att_key=True, norm_rel_ebd="layer_norm",
            type_vocab_size=0, pad_token_id=0)}

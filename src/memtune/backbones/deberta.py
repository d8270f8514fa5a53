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

Side networks (LST, QST): the side blocks are DeBERTa-v2 blocks at width d' that need the distance table at
their own width, 2k×d'. The first side block of the stack owns it (`DebertaV2SideLayer`, as T5's first side
block owns the stack's relative bias), with its LayerNorm at d'; `run_side_block` computes it once per
forward in that block and hands it to the later ones through the side context. It is trained with the side
blocks and starts as the backbone's table (and LayerNorm) pruned along the embedding dimension to the side's
first residual dims P (see `side_table_dims`).

Why a side table initialised here rather than a step of the pruning plan: LST's pruner (methods/lst/prune.py)
copies a parameter from a backbone block to the same path in a side block, slicing 1-D vectors by P, and
`side_shared_tables` copies a table whole. The backbone's table lives in the encoder, outside every block,
and is 2-D with P on its columns, so neither fits; `make_side_block` copies it instead (and
`init_side_weights` again, after HF's init). Consequences: it is not in LST's `pruning_records`; its dims
are those of LST's default magnitude importance even with init="fisher" (which re-picks the blocks' dims
only), and it starts from the backbone's table with init="random" too, and in QST.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Layer

from .base import Backbone, Context, UnsupportedModel, residual_sublayer
from .side_network import PruneGroup, SideNetworkHooks, has_submodule, head_multiple_widths, norm_step


def table_span(config) -> int:
    """k, half the rows of the distance table: position_buckets, or max_relative_positions without buckets
    (max_position_embeddings where that is unset), as DebertaV2Encoder sizes `rel_embeddings`."""
    if getattr(config, "position_buckets", -1) > 0:
        return config.position_buckets
    span = getattr(config, "max_relative_positions", -1)
    return span if span >= 1 else config.max_position_embeddings


def rel_norm_kinds(config) -> list[str]:
    """The normalisations `norm_rel_ebd` asks of the distance table ("layer_norm", or "none")."""
    return [x.strip() for x in getattr(config, "norm_rel_ebd", "none").lower().split("|")]


class DebertaV2SideLayer(DebertaV2Layer):
    """A DeBERTa-v2 block at side width d' that may own its side stack's distance table.

    owns_table (the first side block of a stack, where the config has relative attention): `rel_embeddings`
    (2k×d') and, where `norm_rel_ebd` says "layer_norm", `rel_norm` (LayerNorm over d'), the side copies of
    the backbone encoder's `rel_embeddings` and `LayerNorm`. Otherwise the block is exactly DebertaV2Layer."""

    def __init__(self, config, owns_table: bool = False):
        super().__init__(config)
        self.rel_embeddings = self.rel_norm = None
        if owns_table and getattr(config, "relative_attention", False):
            self.rel_embeddings = nn.Embedding(2 * table_span(config), config.hidden_size)
            if "layer_norm" in rel_norm_kinds(config):
                self.rel_norm = nn.LayerNorm(config.hidden_size, config.layer_norm_eps)

    @property
    def owns_table(self) -> bool:
        return self.rel_embeddings is not None

    def relative_embeddings(self) -> torch.Tensor:
        """The side distance table after its LayerNorm, 2k×d' (DebertaV2Encoder.get_rel_embedding at d')."""
        table = self.rel_embeddings.weight
        return table if self.rel_norm is None else self.rel_norm(table)


class DebertaV2Backbone(SideNetworkHooks, Backbone):
    family = "deberta-v2"
    input_keys = ("input_ids", "attention_mask", "token_type_ids")
    lora_targets = ("query_proj", "value_proj")
    # Dotted suffix "output.dense" names both the attention output (attention.output.dense) and the FFN output
    # (output.dense), as for BERT.
    ia3_targets = ("key_proj", "value_proj", "output.dense")
    ia3_feedforward = ("output.dense",)
    adapter_sites = ("attention.output.dense", "output.dense")
    norm_position = "post"
    capabilities = frozenset({"encoder", "single_stack", "sublayers", "side_network"})

    def __init__(self, model):
        super().__init__(model)
        if self.encoder.conv is not None:
            # The convolution mixes block 0's input into its output after the FFN's LayerNorm, so block 0 is
            # not the composition of two residual sub-layers.
            self.capabilities = type(self).capabilities - {"sublayers"}
            self.gaps = {"sublayers": "its encoder convolution (conv_kernel_size) mixes block 0's input into its "
                                      "output, so block 0 is not two residual sub-layers"}

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

    # -- side networks (LST, QST; see side_network.py) ---------------------------------------------------
    # The attention derives its head width from hidden_size / H, so a side width is a multiple of the side
    # head count H' (H kept by default: head width d_kv/r rounded, at least 1, as for BERT). The blocks are
    # post-LN and the encoder has no final norm, so the side has none. The disentangled attention has no
    # fused (SDPA) path. The xlarge/xxlarge convolution beside block 0 lives in the encoder, not in a block:
    # the side stack has none (its ladders read the backbone's block-0 output, convolution included).
    side_dropout_fields = ("hidden_dropout_prob",)          # residual dropout and the table's pos_dropout
    side_attention_dropout_field = "attention_probs_dropout_prob"
    supports_side_heads = True                               # no per-head tables: any H' dividing d'

    def side_widths(self, config, r, heads, exact):
        """d' = H'·round(d/(r·H')) (H' = H: H·round(d_kv/r)) and d_ff' = round(d_ff/r); exact: d/r, ⌊d_ff/r⌋.
        The distance table keeps its 2k rows (position_buckets, max_relative_positions are not widths)."""
        side_heads = heads or config.num_attention_heads
        d_side, d_ff = head_multiple_widths(config.hidden_size, config.intermediate_size, r, side_heads, exact)
        widths = {"hidden_size": d_side, "num_attention_heads": side_heads, "intermediate_size": d_ff}
        if getattr(config, "attention_head_size", None) is not None:     # an explicit head width: d'/H'
            widths["attention_head_size"] = d_side // side_heads
        return widths

    def make_side_block(self, cfg, index, decoder=False):
        """Side block `index`; the first one (index 0) owns the side distance table, which starts as the
        backbone's pruned to `side_table_dims` (also after `init_side_weights`)."""
        block = DebertaV2SideLayer(cfg, owns_table=index == 0)
        self._copy_pruned_table(block)
        return block

    def init_side_weights(self, module, cfg):
        """HF's init of new weights, except the side distance table: it stays the pruned backbone table."""
        super().init_side_weights(module, cfg)
        for m in module.modules():
            self._copy_pruned_table(m)

    def side_table_dims(self, d_side: int) -> torch.Tensor:
        """P, the d' (sorted) embedding dims the side distance table keeps: the side's first residual dims
        under LST's default magnitude pruning (docs/methods/lst.md §8), the top d' of Σ_v |W_emb[v, j]| (W_emb:
        the V×d token table). Its readers, each side block's query/key (or pos_query/pos_key) projections,
        take their own block's residual dims; one table shared by the stack can follow only one of them, and
        the first block's input dims are the ones the side starts from. With an embedding projection
        (embedding_size ≠ d) the scores are those of its d output rows, Σ_e |W_proj[j, e]|."""
        proj = self.model.embeddings.embed_proj
        if proj is None:
            score = self.pruning_embedding.detach().abs().double().sum(0)     # d
        else:
            score = proj.weight.detach().abs().double().sum(1)               # d (W_proj: d×e)
        return torch.topk(score, d_side).indices.sort().values

    @torch.no_grad()
    def _copy_pruned_table(self, block: nn.Module) -> None:
        """block's table (2k×d') ← the backbone's rel_embeddings[:, P], its LayerNorm ← the backbone's at P."""
        if not (isinstance(block, DebertaV2SideLayer) and block.owns_table):
            return
        src = self.encoder.rel_embeddings.weight                     # 2k×d
        if src.device.type == "meta":                                # planning: shapes only, nothing to copy
            return
        P = self.side_table_dims(block.rel_embeddings.embedding_dim).to(src.device)
        block.rel_embeddings.weight.copy_(src[:, P])
        if block.rel_norm is not None:
            block.rel_norm.weight.copy_(self.encoder.LayerNorm.weight[P])
            block.rel_norm.bias.copy_(self.encoder.LayerNorm.bias[P])

    def side_norm(self, d_side, cfg):
        return nn.Identity()

    @torch.no_grad()
    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        """The backbone's B×1×T×T padding mask and 1×T×T bucketed distances (neither depends on the width);
        "rel_embeddings" (2k×d') is filled by the first side block in `run_side_block`."""
        return {"attn_mask": ctx["attn_mask"], "relative_pos": ctx["relative_pos"], "rel_embeddings": None}

    def run_side_block(self, block, s, sctx):
        if block.owns_table:          # the first side block: the stack's table, once per forward, with autograd
            sctx["rel_embeddings"] = block.relative_embeddings()
        return block(s, sctx["attn_mask"], relative_pos=sctx["relative_pos"],
                     rel_embeddings=sctx["rel_embeddings"])[0]

    @property
    def pruning_embedding(self):
        if self.model.embeddings.embed_proj is not None:
            raise UnsupportedModel("lst: deberta-v2 models whose embedding_size differs from hidden_size have no "
                                   "token table of the residual width to prune the side network from; use "
                                   "init='random'")
        return self.model.embeddings.word_embeddings.weight

    def pruning_plan(self, block):
        # q, k, v share rows with the distance projections (share_att_key false): c2p multiplies q by pos_key,
        # p2c k by pos_query, head dim by head dim. Their columns take the block's residual dims P, as the
        # shared-key content projections' do although they read the table too (kept at `side_table_dims`:
        # the same dims in the first block only). Post-LN: each norm follows its output projection.
        attn = "attention.self"
        inputs = tuple(f"{attn}.{x}" for x in ("query_proj", "key_proj", "value_proj", "pos_key_proj",
                                                "pos_query_proj") if has_submodule(block, f"{attn}.{x}"))
        return [PruneGroup(inputs, "attention.output.dense"), norm_step(block, "attention.output.LayerNorm"),
                PruneGroup(("intermediate.dense",), "output.dense"), norm_step(block, "output.LayerNorm")]

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

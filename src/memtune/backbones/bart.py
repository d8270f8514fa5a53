"""BART and mBART encoder-decoders (Lewis et al., 2020; Liu et al., 2020). The protocol's `blocks` are the
encoder's; the decoder is a second stack, as for T5.

Both stacks embed tokens (× √d where `scale_embedding`), add learned absolute positions (stored with an offset
of 2) and apply `layernorm_embedding` and dropout. BART's blocks are post-LN and its stacks end without a final
norm; mBART's blocks are pre-LN and each stack ends in a final LayerNorm (`layer_norm`).

Classification reads the decoder as BartForSequenceClassification does: without `decoder_input_ids` the decoder
is fed the input shifted right (the decoder start token, then input_ids one step late: what BartModel itself
does), and the pooled feature is the decoder output at the last real input token, the EOS position of a
tokenised input (B×d). With explicit `decoder_input_ids` it is the decoder's last position.

As in BartModel called without `decoder_attention_mask`, decoder self-attention is causal only (padded decoder
positions come after the real ones, which never attend to them). LayerDrop (`encoder_layerdrop`,
`decoder_layerdrop`) is not applied: every block runs, as in the released checkpoints, whose rates are 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from .base import Backbone, Context, residual_sublayer
from .side_network import PruneGroup, SideNetworkHooks, head_multiple_widths, norm_step, side_decoder_masks


class BartBackbone(SideNetworkHooks, Backbone):
    family = "bart"
    input_keys = ("input_ids", "attention_mask", "decoder_input_ids")
    lora_targets = ("q_proj", "v_proj")
    ia3_targets = ("k_proj", "v_proj", "fc2")
    ia3_feedforward = ("fc2",)
    adapter_sites = ("self_attn.out_proj", "encoder_attn.out_proj", "fc2")
    is_encoder_decoder = True
    norm_position = "post"
    dropout_field = "dropout"
    activation_field = "activation_function"
    # "sublayers": the encoder's attention / FFN sub-layers; "decoder_sublayers": the decoder's self-attention,
    # cross-attention and FFN sub-layers (MEFT couples both stacks through them).
    capabilities = frozenset({"encoder_decoder", "side_network", "sublayers", "decoder_sublayers"})

    @property
    def hidden_size(self):
        return self.config.d_model

    @property
    def blocks(self):
        return self.model.encoder.layers

    @property
    def decoder_blocks(self):
        return self.model.decoder.layers

    # -- encoder stack ----------------------------------------------------------------------------
    @staticmethod
    def _embed_stream(stack, ids: torch.Tensor, past: int = 0) -> torch.Tensor:
        """Token ids B×T → LayerNorm(scaled token embedding + positions past..past+T-1), then dropout: B×T×d."""
        e = stack.embed_tokens(ids)                                       # B×T×d, × embed_scale
        pos = stack.embed_positions(ids, past)                            # B×T×d (rows past+2 ..)
        h = stack.layernorm_embedding(e + pos.to(e.device))
        return F.dropout(h, p=stack.dropout, training=stack.training)

    def embed(self, batch):
        ids = batch["input_ids"]                                          # B×Ts
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        enc = self.model.encoder
        h = self._embed_stream(enc, ids)
        ctx: Context = {
            "batch": batch,
            "token_mask": mask,
            "attn_mask": create_bidirectional_mask(config=enc.config, inputs_embeds=h, attention_mask=mask),
        }
        return h, ctx

    def run_block(self, i, h, ctx):
        return self.blocks[i](h, ctx["attn_mask"])

    @property
    def decoder_norm(self):
        """The norm `finish_decoder` applies; None for post-LN BART (mBART: the decoder's final LayerNorm)."""
        return None

    def finish_encoder(self, h, norm=None):
        """The encoder's final norm (`norm` in place of the pretrained one, e.g. a method's own; BART has none,
        so the identity): B×Ts×d."""
        norm = self.final_norm if norm is None else norm
        return h if norm is None else norm(h)

    # -- decoder stack ----------------------------------------------------------------------------
    def shift_input(self, ids: torch.Tensor) -> torch.Tensor:
        """The decoder input BartModel builds when it is given none: the start token, then ids one step late."""
        from transformers.models.bart.modeling_bart import shift_tokens_right

        return shift_tokens_right(ids, self.config.pad_token_id, self.config.decoder_start_token_id)

    def decoder_ids(self, batch) -> torch.Tensor:
        ids = batch.get("decoder_input_ids")
        return self.shift_input(batch["input_ids"]) if ids is None else ids

    def decoder_embed(self, batch, memory, memory_mask, cache=None):
        """memory: encoder output B×Ts×d. Returns the decoder stream B×Tt×d and its ctx. cache: a transformers
        EncoderDecoderCache when decoding new tokens (their positions continue after the cached ones), read and
        extended by `run_decoder_block`."""
        dec = self.model.decoder
        ids = self.decoder_ids(batch)                                     # B×Tt
        past = 0 if cache is None else cache.get_seq_length()
        h = self._embed_stream(dec, ids, past)
        ctx: Context = {
            "memory": memory,
            "attn_mask": create_causal_mask(config=dec.config, inputs_embeds=h, attention_mask=None,
                                            past_key_values=None if cache is None else cache.self_attention_cache),
            "cross_mask": create_bidirectional_mask(config=dec.config, inputs_embeds=h,
                                                    attention_mask=memory_mask, encoder_hidden_states=memory),
            "cache": cache,
        }
        return h, ctx

    def run_decoder_block(self, i, h, ctx):
        return self.decoder_blocks[i](h, ctx["attn_mask"], ctx["memory"], encoder_attention_mask=ctx["cross_mask"],
                                      past_key_values=ctx.get("cache"))

    def finish_decoder(self, h, norm=None):
        norm = self.decoder_norm if norm is None else norm
        return h if norm is None else norm(h)

    def pool(self, h, ctx):
        """Decoder states B×Tt×d → B×d: the last real input token when the decoder read the shifted input (right
        padding), else the decoder's last position."""
        if (ctx.get("batch") or {}).get("decoder_input_ids") is not None:
            return h[:, -1]
        last = ctx["token_mask"].sum(1).long() - 1                        # B
        return h[torch.arange(h.shape[0], device=h.device), last]

    def tied_lm_logits(self, o):
        """o: …×d → …×V logits o·Eᵀ through the shared token embedding E (no d^-1/2 scale, unlike T5). BartModel
        keeps no final_logits_bias (a buffer of BartForConditionalGeneration, zero in the facebook/bart
        checkpoints), so none is added."""
        return F.linear(o, self.model.shared.weight)

    # -- sub-layers (for methods that couple attention and feed-forward separately, e.g. MEFT) ----------
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    #     run_decoder_block(i, x, dctx) == decoder_ffn_sublayer(i, decoder_cross_sublayer(i,
    #                                          decoder_attention_sublayer(i, x, dctx), dctx), dctx)
    # exactly (the encoder's fp16 clamp included), following `norm_position`: BART post-LN LN(x + u(x)) with
    # branch_input x, mBART pre-LN x + u(LN(x)) with branch_input LN(x). `branch_hook(branch_input, u) -> u`
    # edits the branch u (B×T×d, after its residual dropout) before the residual (post-LN: before residual +
    # LayerNorm). Dropout masks are drawn in the block's order (attention, residual; FFN activation, residual).
    def _sublayer(self, blk, x, norm, branch, branch_hook):
        """One residual sub-layer of layer blk: `branch` (B×T×d → B×T×d) then the layer's residual dropout."""
        def dropped(n):
            return F.dropout(branch(n), p=blk.dropout, training=blk.training)
        return residual_sublayer(x, dropped, norm, self.norm_position, branch_hook)

    def _feed_forward(self, blk, a, branch_hook):
        """fc2(Dropout_act(φ(fc1(·)))) of layer blk as a residual sub-layer with its final_layer_norm."""
        def ffn(n):
            u = F.dropout(blk.activation_fn(blk.fc1(n)), p=blk.activation_dropout, training=blk.training)
            return blk.fc2(u)                                             # B×T×d_ff → B×T×d
        return self._sublayer(blk, a, blk.final_layer_norm, ffn, branch_hook)

    @staticmethod
    def _clamp_encoder_output(h):
        """BartEncoderLayer's fp16 guard at the end of the layer: clamp only when a value is not finite."""
        if h.dtype == torch.float16 and not torch.isfinite(h).all():
            big = torch.finfo(h.dtype).max - 1000
            h = torch.clamp(h, min=-big, max=big)
        return h

    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        """Encoder layer i's self-attention sub-layer (padding mask from `embed`): B×Ts×d → B×Ts×d."""
        blk = self.blocks[i]
        return self._sublayer(blk, x, blk.self_attn_layer_norm,
                              lambda n: blk.self_attn(n, attention_mask=ctx["attn_mask"])[0], branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """Encoder layer i's feed-forward sub-layer, the layer's fp16 clamp after it: B×Ts×d → B×Ts×d."""
        return self._clamp_encoder_output(self._feed_forward(self.blocks[i], a, branch_hook))

    def decoder_attention_sublayer(self, i, x, ctx, branch_hook=None):
        """Decoder layer i's causal self-attention sub-layer (ctx from `decoder_embed`): B×Tt×d → B×Tt×d."""
        blk = self.decoder_blocks[i]

        def attn(n):
            return blk.self_attn(n, past_key_values=ctx.get("cache"), attention_mask=ctx["attn_mask"])[0]
        return self._sublayer(blk, x, blk.self_attn_layer_norm, attn, branch_hook)

    def decoder_cross_sublayer(self, i, x, ctx, branch_hook=None):
        """Decoder layer i's cross-attention to ctx["memory"] (the finished encoder output B×Ts×d, read at call
        time, so a caller may put a tensor there that requires grad): B×Tt×d → B×Tt×d."""
        blk = self.decoder_blocks[i]

        def attn(n):
            return blk.encoder_attn(n, key_value_states=ctx["memory"], attention_mask=ctx["cross_mask"],
                                    past_key_values=ctx.get("cache"))[0]
        return self._sublayer(blk, x, blk.encoder_attn_layer_norm, attn, branch_hook)

    def decoder_ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """Decoder layer i's feed-forward sub-layer (no clamp: BartDecoderLayer has none): B×Tt×d → B×Tt×d."""
        return self._feed_forward(self.decoder_blocks[i], a, branch_hook)

    # -- side networks (LST; see side_network.py) ---------------------------------------------------------
    # BartAttention derives its head width from d / H, so a side width is a multiple of H (heads kept). Both
    # stacks share one config; positions are added at the embedding, so the side blocks need masks only.
    # The side's dropout option sets the residual rate `dropout`; the FFN-hidden `activation_dropout` stays the
    # backbone's (as the attention-probability rate has its own option), so by default the side drops as the
    # backbone's blocks do.
    fused_side_attention = True
    side_dropout_fields = ("dropout",)
    side_attention_dropout_field = "attention_dropout"

    def side_widths(self, config, r, heads, exact):
        """d' = H·round(d/(r·H)) (H: both stacks' head counts divide it), each FFN width round(d_ff/r); exact:
        d/r and ⌊d_ff/r⌋."""
        multiple = math.lcm(config.encoder_attention_heads, config.decoder_attention_heads)
        d_side, enc_ff = head_multiple_widths(config.d_model, config.encoder_ffn_dim, r, multiple, exact)
        _, dec_ff = head_multiple_widths(config.d_model, config.decoder_ffn_dim, r, multiple, exact)
        return {"d_model": d_side, "encoder_ffn_dim": enc_ff, "decoder_ffn_dim": dec_ff}

    def side_norm(self, d_side, cfg):
        # Post-LN blocks end in a LayerNorm each, and the stacks have no final norm: neither has the side.
        return nn.Identity()

    @torch.no_grad()
    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        """Side encoder stack: the padding mask at the side config."""
        return {"mask": create_bidirectional_mask(config=cfg, inputs_embeds=s, attention_mask=ctx["token_mask"]),
                "memory": None, "cross_mask": None, "cache": None}

    def side_decoder_context(self, s, memory, memory_mask, cfg, cache=None):
        """Side decoder stack: causal self-attention and cross-attention to memory (side_network.py)."""
        return side_decoder_masks(s, memory, memory_mask, cfg, cache)

    def run_side_block(self, block, s, sctx):
        if sctx["memory"] is None:                                        # an encoder layer
            return block(s, sctx["mask"])
        return block(s, sctx["mask"], sctx["memory"], encoder_attention_mask=sctx["cross_mask"],
                     past_key_values=sctx["cache"])

    def raw_embedding(self, ids, decoder=False):
        """The scaled token embedding B×T×d, without positions or LayerNorm: LST's W0 input. Position-free, so a
        decoded token's is the same with or without a cache; the side stacks get positions through the ladders
        (every backbone block output carries them)."""
        return (self.model.decoder if decoder else self.model.encoder).embed_tokens(ids)

    @property
    def pruning_embedding(self):
        return self.model.shared.weight

    def pruning_plan(self, block):
        attn = PruneGroup(tuple(f"self_attn.{x}_proj" for x in "qkv"), "self_attn.out_proj")
        steps = [(norm_step(block, "self_attn_layer_norm"), attn)]
        if hasattr(block, "encoder_attn"):   # decoder: cross-attention in the same chain, its k/v input columns too
            steps.append((norm_step(block, "encoder_attn_layer_norm"),
                          PruneGroup(tuple(f"encoder_attn.{x}_proj" for x in "qkv"), "encoder_attn.out_proj")))
        steps.append((norm_step(block, "final_layer_norm"), PruneGroup(("fc1",), "fc2")))
        # Pre-LN: each norm reads the residual stream before its sub-layer; post-LN: it takes the sub-layer's new P.
        pre = self.norm_position == "pre"
        return [x for norm, group in steps for x in ((norm, group) if pre else (group, norm))]

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    depth_fields = ("encoder_layers", "decoder_layers")
    pooling = ("the decoder (fed input_ids shifted right) at the last real input token, as "
               "BartForSequenceClassification reads EOS: h[b, sum(attention_mask[b]) - 1] (B×d)")

    @classmethod
    def size_fields(cls, model_type):
        return ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim")

    @classmethod
    def max_positions(cls, config):
        """Learned absolute positions 0..max_position_embeddings - 1 (stored with an offset of 2)."""
        return int(config.max_position_embeddings)

    @classmethod
    def hf_model_class(cls):
        from transformers import BartModel

        return BartModel

    @classmethod
    def planning_batch(cls, config, batch_size, max_length, image_size=None, target_length=1,
                       dtype=torch.float32, device="meta"):
        """Without decoder ids the decoder reads the shifted input (max_length positions, memtune's
        classification); a longer target gives decoder_input_ids B×target_length."""
        batch = super().planning_batch(config, batch_size, max_length, device=device)
        if target_length > 1:
            batch["decoder_input_ids"] = torch.zeros(batch_size, target_length, dtype=torch.long, device=device)
        return batch

    @classmethod
    def tiny_configs(cls):
        from transformers import BartConfig

        return {"tiny-bart": BartConfig(**_tiny_fields())}


class MBartBackbone(BartBackbone):
    """mBART: pre-LN blocks, a final LayerNorm after each stack, √d-scaled embeddings. Its decoder input is the
    input shifted right with the last real token (the language id, or EOS) moved to the front."""
    norm_position = "pre"

    @property
    def final_norm(self):
        return self.model.encoder.layer_norm

    @property
    def decoder_norm(self):
        return self.model.decoder.layer_norm

    @staticmethod
    def _clamp_encoder_output(h):
        """MBartEncoderLayer's fp16 guard at the end of the layer: always clamp to ±(max − 1000) in fp16."""
        if h.dtype == torch.float16:
            big = torch.finfo(h.dtype).max - 1000
            h = torch.clamp(h, min=-big, max=big)
        return h

    def shift_input(self, ids):
        from transformers.models.mbart.modeling_mbart import shift_tokens_right

        return shift_tokens_right(ids, self.config.pad_token_id)

    def shift_right(self, targets):
        """Teacher forcing as MBartForConditionalGeneration: targets B×Tt (-100 at padding) shifted right, their
        last real token wrapped to the front."""
        return self.shift_input(targets)

    def side_norm(self, d_side, cfg):
        return nn.LayerNorm(d_side)                                       # the side stacks' final norm, as mBART's

    pooling = ("the decoder (fed input_ids shifted right, last real token in front) at the last real input "
               "token: h[b, sum(attention_mask[b]) - 1] (B×d)")

    @classmethod
    def hf_model_class(cls):
        from transformers import MBartModel

        return MBartModel

    @classmethod
    def tiny_configs(cls):
        from transformers import MBartConfig

        return {"tiny-mbart": MBartConfig(**_tiny_fields(), scale_embedding=True)}


def _tiny_fields() -> dict:
    """d = 64, 4 + 4 blocks of 4 heads, FFN 128, the character tokenizer's vocabulary and special ids
    ([PAD] = 0, [CLS] = 2 as BOS, [SEP] = 3 as EOS and, as in BART, the decoder start token)."""
    from ..tokenizer import SPECIALS, VOCAB_SIZE

    pad, bos, eos = SPECIALS.index("[PAD]"), SPECIALS.index("[CLS]"), SPECIALS.index("[SEP]")
    return dict(vocab_size=VOCAB_SIZE, d_model=64, encoder_layers=4, decoder_layers=4, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=512,
                pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, decoder_start_token_id=eos,
                forced_eos_token_id=None)

"""T5 encoder-decoder. The protocol's `blocks` are the encoder's; the decoder is a second stack.

For classification the decoder reads a single start token and the pooled feature is its output
(B×d), so the whole pretrained network is used as in text-to-text with one output position.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from .base import Backbone, Context, UnsupportedModel, residual_sublayer
from .side_network import (PruneGroup, SideNetworkHooks, build_block, has_submodule, nearest_width, norm_step,
                           side_decoder_masks)


class T5Backbone(SideNetworkHooks, Backbone):
    family = "t5"
    input_keys = ("input_ids", "attention_mask", "decoder_input_ids")
    lora_targets = ("q", "v")
    ia3_targets = ("k", "v", "wo")
    ia3_feedforward = ("wo",)
    adapter_sites = ("SelfAttention.o", "EncDecAttention.o", "DenseReluDense.wo")
    is_encoder_decoder = True
    dropout_field = "dropout_rate"
    activation_field = "dense_act_fn"
    # "sublayers": the encoder's attention / FFN sub-layers; "decoder_sublayers": the decoder's self-attention,
    # cross-attention and FFN sub-layers (MEFT couples both stacks through them).
    capabilities = frozenset({"encoder_decoder", "side_network", "sublayers", "decoder_sublayers"})

    @property
    def hidden_size(self):
        return self.config.d_model

    @property
    def blocks(self):
        return self.model.encoder.block

    @property
    def decoder_blocks(self):
        return self.model.decoder.block

    # -- encoder stack ----------------------------------------------------------------------------
    def embed(self, batch):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        enc = self.model.encoder
        h = enc.embed_tokens(ids)
        ctx: Context = {
            "batch": batch,
            "token_mask": mask,
            "attn_mask": create_bidirectional_mask(config=enc.config, inputs_embeds=h, attention_mask=mask),
            "position_bias": None,  # B×H×T×T, made by block 0 and shared by the others
        }
        return enc.dropout(h), ctx

    def run_block(self, i, h, ctx):
        h, ctx["position_bias"], _ = self.blocks[i](h, ctx["attn_mask"], ctx["position_bias"])
        return h

    @property
    def final_norm(self):
        return self.model.encoder.final_layer_norm

    @property
    def decoder_norm(self):
        return self.model.decoder.final_layer_norm

    def finish_encoder(self, h, norm=None):
        """Final norm (`norm` in place of the pretrained one, e.g. a method's own) and dropout: B×Ts×d."""
        enc = self.model.encoder
        return enc.dropout((norm or enc.final_layer_norm)(h))

    # -- decoder stack ----------------------------------------------------------------------------
    def decoder_ids(self, batch) -> torch.Tensor:
        ids = batch.get("decoder_input_ids")
        if ids is None:
            start = self.config.decoder_start_token_id or 0
            ids = torch.full((batch["input_ids"].shape[0], 1), start, device=batch["input_ids"].device)
        return ids

    def decoder_embed(self, batch, memory, memory_mask, cache=None):
        """memory: encoder output B×Ts×d. Returns the decoder stream B×Tt×d and its ctx. cache: a transformers
        EncoderDecoderCache when decoding new tokens, read and extended by `run_decoder_block`."""
        dec = self.model.decoder
        ids = self.decoder_ids(batch)
        h = dec.embed_tokens(ids)
        ctx: Context = {
            "memory": memory,
            "attn_mask": create_causal_mask(config=dec.config, inputs_embeds=h, attention_mask=None,
                                            past_key_values=None if cache is None else cache.self_attention_cache),
            "cross_mask": create_bidirectional_mask(config=dec.config, inputs_embeds=h,
                                                    attention_mask=memory_mask, encoder_hidden_states=memory),
            "position_bias": None,
            "cross_bias": None,
            "cache": cache,
        }
        return dec.dropout(h), ctx

    def run_decoder_block(self, i, h, ctx):
        h, ctx["position_bias"], ctx["cross_bias"] = self.decoder_blocks[i](
            h, ctx["attn_mask"], ctx["position_bias"], ctx["memory"], ctx["cross_mask"], ctx["cross_bias"],
            past_key_values=ctx.get("cache"),
        )
        return h

    def finish_decoder(self, h, norm=None):
        dec = self.model.decoder
        return dec.dropout((norm or dec.final_layer_norm)(h))

    def pool(self, h, ctx):
        return h[:, 0]  # the start position's decoder output: B×d

    # -- sub-layers (for methods that couple attention and feed-forward separately, e.g. MEFT) ----------
    # Pre-norm with RMS norm: each sub-layer is x + Dropout(branch(RMSNorm(x))), residual included, so
    #     run_block(i, x, ctx) == ffn_sublayer(i, attention_sublayer(i, x, ctx), ctx)
    #     run_decoder_block(i, x, dctx) == decoder_ffn_sublayer(i, decoder_cross_sublayer(i,
    #                                          decoder_attention_sublayer(i, x, dctx), dctx), dctx)
    # exactly (fp16 clamps included). `branch_hook(branch_input, branch_output) -> branch_output` edits the
    # branch (B×T×d, after its dropout) before the residual; branch_input is the normalised RMSNorm(x).
    # Self-attention keeps ctx["position_bias"] as run_block does: block 0 makes the 1×H×T×T relative bias
    # (from its frozen table, so it never carries a gradient) and every later call reuses it; the decoder's
    # cross-attention likewise keeps its (zero) bias in ctx["cross_bias"].
    @staticmethod
    def _clamp_fp16(h):
        """T5Block's clamp after every sub-layer in float16 (keeps inf out of the residual stream)."""
        if h.dtype != torch.float16:
            return h
        big = torch.finfo(h.dtype).max
        clamp = torch.where(torch.isinf(h).any(), big - 1000, big)
        return torch.clamp(h, min=-clamp, max=clamp)

    def _self_attention(self, layer, x, ctx, branch_hook):
        """x + Dropout(SelfAttn(RMSNorm(x))) of a T5LayerSelfAttention, with ctx's mask and relative bias."""
        def attn(n):
            out, ctx["position_bias"], _ = layer.SelfAttention(n, mask=ctx["attn_mask"],
                                                               position_bias=ctx["position_bias"],
                                                               past_key_values=ctx.get("cache"))
            return layer.dropout(out)
        return self._clamp_fp16(residual_sublayer(x, attn, layer.layer_norm, "pre", branch_hook))

    def _feed_forward(self, layer, a, branch_hook):
        """a + Dropout(DenseReluDense(RMSNorm(a))) of a T5LayerFF."""
        return self._clamp_fp16(residual_sublayer(a, lambda n: layer.dropout(layer.DenseReluDense(n)),
                                                  layer.layer_norm, "pre", branch_hook))

    def attention_sublayer(self, i, x, ctx, branch_hook=None):
        """Encoder block i's self-attention sub-layer: B×Ts×d → B×Ts×d."""
        return self._self_attention(self.blocks[i].layer[0], x, ctx, branch_hook)

    def ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """Encoder block i's feed-forward sub-layer: B×Ts×d → B×Ts×d."""
        return self._feed_forward(self.blocks[i].layer[-1], a, branch_hook)

    def decoder_attention_sublayer(self, i, x, ctx, branch_hook=None):
        """Decoder block i's causal self-attention sub-layer (ctx from `decoder_embed`): B×Tt×d → B×Tt×d."""
        return self._self_attention(self.decoder_blocks[i].layer[0], x, ctx, branch_hook)

    def decoder_cross_sublayer(self, i, x, ctx, branch_hook=None):
        """Decoder block i's cross-attention to ctx["memory"] (the finished encoder output B×Ts×d, read at call
        time, so a caller may put a tensor there that requires grad): x + Dropout(CrossAttn(RMSNorm(x), memory))."""
        layer = self.decoder_blocks[i].layer[1]

        def attn(n):
            out, ctx["cross_bias"], _ = layer.EncDecAttention(n, mask=ctx["cross_mask"], key_value_states=ctx["memory"],
                                                              position_bias=ctx["cross_bias"],
                                                              past_key_values=ctx.get("cache"))
            return layer.dropout(out)
        return self._clamp_fp16(residual_sublayer(x, attn, layer.layer_norm, "pre", branch_hook))

    def decoder_ffn_sublayer(self, i, a, ctx, branch_hook=None):
        """Decoder block i's feed-forward sub-layer: B×Tt×d → B×Tt×d."""
        return self._feed_forward(self.decoder_blocks[i].layer[-1], a, branch_hook)

    # -- side networks (LST; see side_network.py) ---------------------------------------------------------
    # T5 attention has an explicit d_kv, a single dropout rate and no fused path. The first side block of each
    # stack owns the stack's 32×H relative-position table (H is kept), copied whole from backbone block 0.
    side_dropout_fields = ("dropout_rate",)
    side_shared_tables = ("layer.0.SelfAttention.relative_attention_bias.weight",)

    def stack_config(self, decoder=False):
        return (self.model.decoder if decoder else self.model.encoder).config

    def side_widths(self, config, r, heads, exact):
        """d_model, d_ff and d_kv each round(x/r) (exact: ⌊x/r⌋); the head count is kept."""
        def width(x):
            return x // r if exact else nearest_width(x, r)
        return {"d_model": width(config.d_model), "d_ff": width(config.d_ff), "d_kv": width(config.d_kv)}

    def side_width_problem(self, r, heads=None):
        """Exact widths (QST): d_model/r, and a head width d_kv/r, since T5's heads are d_kv wide whatever d
        is (H·d_kv need not equal d); the head count is kept."""
        d, d_kv = self.config.d_model, self.config.d_kv
        if d % r:
            return f"d={d} is not divisible by r={r}"
        if d_kv % r:
            return f"the head width d_kv={d_kv} is not divisible by r={r}"
        return None

    def make_side_block(self, cfg, index, decoder=False):
        blocks = self.decoder_blocks if decoder else self.blocks
        return build_block(type(blocks[0]), cfg, index, has_relative_attention_bias=(index == 0))

    def side_norm(self, d_side, cfg):
        return type(self.final_norm)(d_side, eps=cfg.layer_norm_epsilon)

    @torch.no_grad()
    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        """Side encoder stack: the padding mask; `run_side_block` keeps the B×H×T×T relative bias that the
        first side block makes, for the others."""
        mask = create_bidirectional_mask(config=cfg, inputs_embeds=s, attention_mask=ctx["token_mask"])
        return {"mask": mask, "memory": None, "cross_mask": None, "cache": None,
                "position_bias": None, "cross_bias": None}

    def side_decoder_context(self, s, memory, memory_mask, cfg, cache=None):
        """Side decoder stack: causal self-attention and cross-attention to memory (side_network.py), plus the
        two relative biases the first side decoder block makes."""
        return {**side_decoder_masks(s, memory, memory_mask, cfg, cache), "position_bias": None, "cross_bias": None}

    def run_side_block(self, block, s, sctx):
        s, sctx["position_bias"], sctx["cross_bias"] = block(
            s, sctx["mask"], sctx["position_bias"], sctx["memory"], sctx["cross_mask"], sctx["cross_bias"],
            past_key_values=sctx["cache"])
        return s

    def raw_embedding(self, ids, decoder=False):
        return (self.model.decoder if decoder else self.model.encoder).embed_tokens(ids)

    def tied_lm_logits(self, o):
        """o: …×d → …×V logits LMHead(o·d^-1/2), T5's LM head tied to the input embedding."""
        if not getattr(self.config, "scale_decoder_outputs", True):
            raise UnsupportedModel("this T5 checkpoint has an untied LM head (e.g. T5 v1.1), which T5Model does "
                                   "not keep; text-to-text logits need the tied embedding")
        return F.linear(o * self.config.d_model ** -0.5, self.model.shared.weight)

    @property
    def pruning_embedding(self):
        return self.model.shared.weight

    def pruning_plan(self, block):
        ff_index = len(block.layer) - 1
        ff = f"layer.{ff_index}.DenseReluDense"
        ff_in = (f"{ff}.wi_0", f"{ff}.wi_1") if has_submodule(block, f"{ff}.wi_0") else (f"{ff}.wi",)
        steps = [norm_step(block, "layer.0.layer_norm"),
                 PruneGroup(tuple(f"layer.0.SelfAttention.{x}" for x in "qkv"), "layer.0.SelfAttention.o")]
        if ff_index == 2:   # decoder: cross-attention in the same chain, its k/v input columns too
            steps += [norm_step(block, "layer.1.layer_norm"),
                      PruneGroup(tuple(f"layer.1.EncDecAttention.{x}" for x in "qkv"), "layer.1.EncDecAttention.o")]
        return steps + [norm_step(block, f"layer.{ff_index}.layer_norm"), PruneGroup(ff_in, f"{ff}.wo")]

    # -- planner facts (see Backbone) ------------------------------------------------------------------
    depth_fields = ("num_layers", "num_decoder_layers")
    pooling = "the decoder's output at its start position: h[:, 0] of the decoder states (B×d)"

    @classmethod
    def size_fields(cls, model_type):
        return ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")

    @classmethod
    def hf_model_class(cls):
        from transformers import T5Model

        return T5Model

    @classmethod
    def planning_batch(cls, config, batch_size, max_length, image_size=None, target_length=1,
                       dtype=torch.float32, device="meta"):
        """Without decoder ids the decoder reads one start token (memtune's classification); a longer
        target gives decoder_input_ids B×target_length."""
        batch = super().planning_batch(config, batch_size, max_length, device=device)
        if target_length > 1:
            batch["decoder_input_ids"] = torch.zeros(batch_size, target_length, dtype=torch.long, device=device)
        return batch

    @classmethod
    def tiny_configs(cls):
        from transformers import T5Config

        from ..tokenizer import VOCAB_SIZE

        return {"tiny-t5": T5Config(vocab_size=VOCAB_SIZE, d_model=64, d_kv=16, d_ff=128, num_layers=4,
                                    num_decoder_layers=4, num_heads=4, decoder_start_token_id=0, pad_token_id=0)}

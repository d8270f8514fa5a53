"""T5 text-to-text output of LST (docs/methods/lst.md §4): LM logits through the tied embedding, and decoding.

Both decoders keep their own KV cache: the backbone decoder (self-attention over the generated tokens,
cross-attention to the backbone encoder output) and the side decoder (self-attention, cross-attention
to s_enc). Only the backbone decoder layers up to the last kept layer run, so only they have caches.
For beam search the encoder outputs (backbone memory and s_enc) are expanded per beam, and both caches
are reordered with the surviving beams every step (docs/methods/lst.md §12: the side state must follow the beams too).

Beam search here is the plain form: no length penalty; a beam that emitted EOS is finished and can
only continue with padding at no cost, so it keeps competing with its final score.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from ...backbones import UnsupportedModel


def t5_lm_logits(model, o: torch.Tensor) -> torch.Tensor:
    """o: …×d up-projected side decoder output → …×V logits, LMHead(o·d^-1/2) with the tied embedding."""
    bb = model.backbone
    if bb.family != "t5":
        raise UnsupportedModel("lst: lm_logits(o) is the T5 text-to-text head; decoders use the backbone's "
                               "lm_logits, encoders have none")
    cfg = bb.config
    if not getattr(cfg, "scale_decoder_outputs", True):
        raise UnsupportedModel("lst: this T5 checkpoint has an untied LM head (e.g. T5 v1.1), which T5Model "
                               "does not keep; text-to-text logits need the tied embedding")
    return F.linear(o * cfg.d_model ** -0.5, bb.model.shared.weight)


def _new_cache(config) -> EncoderDecoderCache:
    return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))


@torch.no_grad()
def t5_generate(model, input_ids, attention_mask=None, max_new_tokens: int = 20, num_beams: int = 1,
                stop_at_eos: bool = True) -> torch.Tensor:
    """Returns B×(1+n) token ids starting with the decoder start token (padding after EOS).

    Runs in eval mode (restored afterwards). num_beams = 1 is greedy decoding.
    """
    bb = model.backbone
    if bb.family != "t5":
        raise UnsupportedModel("lst: generate is implemented for the T5 family (text-to-text)")
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"lst.generate: num_beams and max_new_tokens must be >= 1, got {num_beams}, "
                         f"{max_new_tokens}")
    was_training = model.training
    model.eval()
    try:
        return _decode(model, input_ids, attention_mask, max_new_tokens, num_beams, stop_at_eos)
    finally:
        model.train(was_training)


def _decode(model, input_ids, attention_mask, max_new_tokens, k, stop_at_eos):
    bb = model.backbone
    cfg = bb.config
    dec = bb.model.decoder
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    B = input_ids.shape[0]
    eos, pad = cfg.eos_token_id, cfg.pad_token_id or 0
    start = cfg.decoder_start_token_id or 0

    enc_taps, ctx = model.encoder_taps({"input_ids": input_ids, "attention_mask": attention_mask})
    s_enc = model.side_encode(enc_taps, ctx).repeat_interleave(k, 0)        # (B·k)×Ts×d'
    memory = ctx["memory"].repeat_interleave(k, 0)                          # (B·k)×Ts×d
    mask = attention_mask.repeat_interleave(k, 0)                           # (B·k)×Ts
    side_ctx = {"token_mask": mask}
    bb_cache, side_cache = _new_cache(dec.config), _new_cache(model.side_configs["decoder"])
    keep = model.stacks["decoder"].keep

    ids = torch.full((B * k, 1), start, dtype=torch.long, device=input_ids.device)
    scores = torch.zeros(B, k, device=input_ids.device)
    scores[:, 1:] = float("-inf")                                           # beams start as copies: use one
    finished = torch.zeros(B * k, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        # Backbone decoder, one new position, reading its cache.
        e = dec.embed_tokens(ids[:, -1:])                                   # (B·k)×1×d
        h = dec.dropout(e)
        self_mask = create_causal_mask(config=dec.config, inputs_embeds=h, attention_mask=None,
                                       past_key_values=bb_cache.self_attention_cache)
        cross_mask = create_bidirectional_mask(config=dec.config, inputs_embeds=h, attention_mask=mask,
                                               encoder_hidden_states=memory)
        taps, bias, cross_bias = {"embed": e}, None, None
        for i in range(keep[-1] + 1):
            h, bias, cross_bias = bb.decoder_blocks[i](h, self_mask, bias, memory, cross_mask, cross_bias,
                                                      past_key_values=bb_cache)
            if i in keep:
                taps[i] = h
        o = model.side_decode(taps, s_enc, side_ctx, cache=side_cache)      # (B·k)×1×d
        logp = F.log_softmax(t5_lm_logits(model, o[:, -1]).float(), dim=-1)  # (B·k)×V
        if stop_at_eos:
            logp[finished] = float("-inf")
            logp[finished, pad] = 0.0
        if k == 1:
            nxt = logp.argmax(-1)
        else:
            V = logp.shape[-1]
            cand = (scores.reshape(B * k, 1) + logp).view(B, k * V)
            scores, flat = cand.topk(k, dim=-1)                             # B×k
            src = (flat // V + torch.arange(B, device=flat.device)[:, None] * k).flatten()
            nxt = (flat % V).flatten()
            ids, finished = ids[src], finished[src]
            bb_cache.reorder_cache(src)
            side_cache.reorder_cache(src)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        if stop_at_eos and eos is not None:
            finished = finished | (nxt == eos)
            if bool(finished.all()):
                break
    if k > 1:
        best = scores.argmax(-1)                                            # B
        ids = ids.view(B, k, -1)[torch.arange(B, device=ids.device), best]
    return ids

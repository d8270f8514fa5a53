"""Text-to-text decoding with LST on an encoder-decoder (T5; docs/methods/lst.md §4): greedy or beam search.

Both decoders keep their own KV cache: the backbone decoder (self-attention over the generated tokens,
cross-attention to the backbone encoder output) and the side decoder (self-attention, cross-attention
to s_enc). Only the backbone decoder layers up to the last kept layer run, so only they have caches.
For beam search the encoder outputs (backbone memory and s_enc) are expanded per beam, and both caches
are reordered with the surviving beams every step (docs/methods/lst.md §12: the side state must follow the beams too).

LST-VL (image-text compositions; docs/methods/vl.md §2, specs/vl.md §5.8): `visual` holds pixel_values (and
pixel_values_2 for two-image examples). The backbone encoder still reads the text only (memory B×T×d, text mask
B×T); the side encoder reads [text ; visual], so s_enc is B×(T+V)×d' (V = 36 or 72). Per beam: s_enc is
expanded to (B·k)×(T+V)×d', the side decoder's cross-attention mask [text mask ; ones(V)] is rebuilt from the
expanded text mask (`LSTModel.side_decode`), and the side KV cache, whose cross-attention part holds keys and
values over those T+V positions, is reordered with the beams like the backbone decoder's.

Beam search here is the plain form: no length penalty; a beam that emitted EOS is finished and can
only continue with padding at no cost, so it keeps competing with its final score.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from ...backbones import UnsupportedModel


def _new_cache(config) -> EncoderDecoderCache:
    return EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))


@torch.no_grad()
def text_to_text_generate(model, input_ids, attention_mask=None, max_new_tokens: int = 20, num_beams: int = 1,
                          stop_at_eos: bool = True, visual: dict | None = None) -> torch.Tensor:
    """Returns B×(1+n) token ids starting with the decoder start token (padding after EOS).

    Runs in eval mode (restored afterwards). num_beams = 1 is greedy decoding. visual: the image inputs of an
    image-text composition ({"pixel_values": B×3×S×S[, "pixel_values_2": B×3×S×S]}), read by the side encoder.
    """
    if not model.backbone.is_encoder_decoder:
        raise UnsupportedModel(f"lst: generate is implemented for encoder-decoder backbones (text-to-text), "
                               f"not {model.backbone.family}")
    if num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"lst.generate: num_beams and max_new_tokens must be >= 1, got {num_beams}, "
                         f"{max_new_tokens}")
    was_training = model.training
    model.eval()
    try:
        return _decode(model, input_ids, attention_mask, max_new_tokens, num_beams, stop_at_eos, visual or {})
    finally:
        model.train(was_training)


def _decode(model, input_ids, attention_mask, max_new_tokens, k, stop_at_eos, visual):
    bb = model.backbone
    cfg = bb.config
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    B = input_ids.shape[0]
    eos, pad = cfg.eos_token_id, cfg.pad_token_id or 0
    start = cfg.decoder_start_token_id or 0

    enc_taps, ctx = model.encoder_taps({"input_ids": input_ids, "attention_mask": attention_mask, **visual})
    # LST-VL: s_enc spans T+V positions, the backbone memory and the text mask T (side_decode adds ones(V)).
    s_enc = model.side_encode(enc_taps, ctx).repeat_interleave(k, 0)        # (B·k)×(Ts[+V])×d'
    beams_ctx = {"memory": ctx["memory"].repeat_interleave(k, 0),          # (B·k)×Ts×d
                 "token_mask": attention_mask.repeat_interleave(k, 0)}      # (B·k)×Ts
    bb_cache = _new_cache(bb.stack_config(decoder=True))
    side_cache = _new_cache(model.side_configs["decoder"])

    ids = torch.full((B * k, 1), start, dtype=torch.long, device=input_ids.device)
    scores = torch.zeros(B, k, device=input_ids.device)
    scores[:, 1:] = float("-inf")                                           # beams start as copies: use one
    finished = torch.zeros(B * k, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        # Both decoders, one new position, reading their caches.
        taps = model.decoder_taps({"decoder_input_ids": ids[:, -1:]}, beams_ctx, cache=bb_cache)
        o = model.side_decode(taps, s_enc, beams_ctx, cache=side_cache)      # (B·k)×1×d
        logp = F.log_softmax(model.lm_logits(o[:, -1]).float(), dim=-1)      # (B·k)×V
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

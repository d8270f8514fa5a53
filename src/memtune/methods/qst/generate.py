"""Greedy decoding for QST on Llama-like causal LMs (docs/methods/qst.md §3 "Inference", §9.11).

Both networks keep a KV cache: the frozen backbone's blocks and the side blocks (the side one is 1/r of the
backbone's: d' = d/r keys and values per token). One step, for the new tokens x (B×L, L = the prompt length
at the first step, then 1):

    e = Emb(x);  s = D_0(e)                                             e: B×L×d, s: B×L×d'
    for i in 0..N-1:
        h = F_i(h; backbone cache)                                      frozen block, B×L×d
        s = G_i((1−β_i)⊙D_i(h) + β_i⊙s; side cache)                      side block, B×L×d'
    o = mix(Norm_f(h), Up(Norm_side(s)));  next = argmax LMHead(o[:, -1])

which is the training forward restricted to the new positions, so the tokens are the argmax of the
teacher-forced logits. Prompts may be left-padded (attention_mask 0 before the text): positions count real
tokens only, so a padded prompt gives the tokens of the same prompt alone. Right padding is refused (the new
token would not follow the text).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache

from ...backbones import UnsupportedModel
from ..base import ConfigError


def check_prompts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  max_new_tokens: int) -> torch.Tensor:
    """The B×T 0/1 mask of valid prompts, or a clear error."""
    if not model.backbone.is_causal_lm or model.objective != "causal-lm":
        raise UnsupportedModel("qst: generate needs a Llama-like decoder wrapped for causal LM (num_labels=None); "
                               f"this model is a {model.backbone.family} {model.objective} model")
    if max_new_tokens < 1:
        raise ConfigError(f"qst.generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ConfigError(f"qst.generate: input_ids must be B×T with T >= 1, got shape {tuple(input_ids.shape)}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device).long()
    if mask.shape != input_ids.shape:
        raise ConfigError(f"qst.generate: attention_mask has shape {tuple(mask.shape)}, input_ids "
                          f"{tuple(input_ids.shape)}")
    if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ConfigError("qst.generate: prompts must be left-padded (attention_mask 0s, if any, before the "
                          "text and the last position real); pad on the left for generation")
    return mask


def decode_step(model, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, bb_cache: DynamicCache,
                side_cache: DynamicCache) -> torch.Tensor:
    """New tokens x (B×L) at positions pos (B×L), mask B×(past + L) → mixed states o, B×L×d."""
    bb = model.backbone
    e, ctx = bb.embed_new_tokens(x, mask, pos, bb_cache)                      # e: B×L×d
    s = model.side.start(e)                                                    # B×L×d'
    sctx = bb.side_context(s, ctx, model.side_config, model.rotary, cache=side_cache)
    for i, h in bb.iter_blocks(e, ctx, bb.num_layers):
        s = bb.run_side_block(model.side.blocks[i], model.side.fuse(i, s, h), sctx)
    return model.mix(bb.finish(h, ctx), model.side.finish(s))                 # B×L×d


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    max_new_tokens: int = 20, stop_at_eos: bool = True) -> torch.Tensor:
    """B×(T + n) ids: the prompts followed by n ≤ max_new_tokens greedy tokens. With stop_at_eos a row that
    emitted an EOS id (config.eos_token_id: one id or a list) continues with pad, and decoding stops once
    every row has. Runs in eval mode (restored afterwards)."""
    mask = check_prompts(model, input_ids, attention_mask, max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        return _decode(model, input_ids, mask, max_new_tokens, stop_at_eos)
    finally:
        model.train(was_training)


def _decode(model, ids, mask, max_new_tokens, stop_at_eos):
    cfg = model.backbone.config
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    eos = cfg.eos_token_id if stop_at_eos else None
    eos = None if eos is None else torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=ids.device)
    bb_cache, side_cache = DynamicCache(config=cfg), DynamicCache(config=model.side_config)
    out, new = ids, ids
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        past = out.shape[1] - new.shape[1]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]                   # B×L: real tokens counted only
        o = decode_step(model, new, mask, pos, bb_cache, side_cache)
        nxt = model.backbone.lm_logits(o[:, -1]).argmax(-1)                   # B
        if eos is not None:
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            finished = finished | torch.isin(nxt, eos)
        out = torch.cat([out, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        new = nxt[:, None]
        if eos is not None and bool(finished.all()):
            break
    return out

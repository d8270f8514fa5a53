"""QST greedy decoding (docs/methods/qst.md §9.11) on the tiny LLaMA of docs/methods/qst.md §9: with KV caches for the backbone and the side
blocks, the tokens are the argmax of the teacher-forced logits.

Token comparisons are exact; they are well posed because every compared argmax wins by a margin (asserted
≥ 1e-4) far above the difference between the cached and the full forward (fp32, a few ulps of logits ~1).
"""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from memtune.backbones import UnsupportedModel
from memtune.methods import ConfigError
from memtune.methods.qst.generate import decode_step

from .test_qst import randomize_side, wrap_spec, wrap_tiny

MARGIN = 1e-4


def side_model():
    """Sigmoid mix and random side weights: the side network shapes every token."""
    model = wrap_spec(mix="sigmoid").eval()
    randomize_side(model)
    return model


def prompts(b=2, t=5, seed=3):
    return torch.randint(5, 100, (b, t), generator=torch.Generator().manual_seed(seed))


def top2_margin(logits):
    top = logits.topk(2, dim=-1).values
    return (top[..., 0] - top[..., 1]).min().item()


def test_greedy_tokens_are_the_argmax_of_teacher_forced_logits():
    model = side_model()
    x = prompts()
    T, n = x.shape[1], 8
    out = model.generate(x, max_new_tokens=n, stop_at_eos=False)
    assert out.shape == (2, T + n) and torch.equal(out[:, :T], x)
    with torch.no_grad():
        logits = model(input_ids=out, attention_mask=torch.ones_like(out)).logits      # teacher-forced
    step = logits[:, T - 1:-1]                                                         # B×n
    assert top2_margin(step) > MARGIN
    assert torch.equal(out[:, T:], step.argmax(-1))
    # Without the side network's contribution the tokens would differ: the check is not the backbone's alone.
    with torch.no_grad():
        h, _ = model.backbone({"input_ids": out})
        assert not torch.equal(model.backbone.lm_logits(h)[:, T - 1:-1].argmax(-1), out[:, T:])


def test_cached_steps_give_the_full_forward_states_and_the_side_cache_is_1_over_r():
    model = side_model()
    x = prompts(t=7)
    mask = torch.ones_like(x)
    pos = torch.arange(7)[None].expand(2, -1)
    bb_cache, side_cache = DynamicCache(config=model.backbone.config), DynamicCache(config=model.side_config)
    with torch.no_grad():
        full, _, _ = model.mixed_output({"input_ids": x, "attention_mask": mask})     # B×7×d, no cache
        first = decode_step(model, x[:, :4], mask[:, :4], pos[:, :4], bb_cache, side_cache)
        rest = [decode_step(model, x[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], bb_cache, side_cache)
                for t in range(4, 7)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, rtol=1e-5, atol=1e-5)
    assert bb_cache.get_seq_length() == side_cache.get_seq_length() == 7

    def kv_bytes(cache):
        return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))

    assert len(side_cache.layers) == len(bb_cache.layers) == 2
    assert kv_bytes(side_cache) * model.r == kv_bytes(bb_cache)                      # head width d/(rH)


def test_left_padded_prompts_give_the_tokens_of_each_prompt_alone():
    model = side_model()
    x = prompts(t=6)
    padded = x.clone()
    padded[0, :2] = 0
    mask = torch.ones_like(x)
    mask[0, :2] = 0                                          # row 0: a 4-token prompt, left-padded
    out = model.generate(padded, mask, max_new_tokens=5, stop_at_eos=False)
    for row, prompt in ((0, x[0:1, 2:]), (1, x[1:2])):
        alone = model.generate(prompt, max_new_tokens=5, stop_at_eos=False)
        with torch.no_grad():
            margin = top2_margin(model(input_ids=alone).logits[:, prompt.shape[1] - 1:-1])
        assert margin > MARGIN
        assert torch.equal(out[row, 6:], alone[0, prompt.shape[1]:])


def test_eos_ends_a_row_and_the_mode_is_restored():
    model = side_model().train()
    x = prompts()
    free = model.generate(x, max_new_tokens=4, stop_at_eos=False)
    assert model.training
    cfg = model.backbone.config
    cfg.eos_token_id, cfg.pad_token_id = int(free[0, 5]), 0   # row 0's first new token is now EOS
    stopped = model.generate(x, max_new_tokens=4)
    assert stopped[0, 5] == free[0, 5] and torch.all(stopped[0, 6:] == 0)
    assert cfg.eos_token_id not in free[1, 5:].tolist()       # so row 1 runs on unchanged
    assert torch.equal(stopped[1], free[1])
    cfg.eos_token_id = [int(free[0, 5]), int(free[1, 5])]      # both end at once: decoding stops early
    assert model.generate(x, max_new_tokens=4).shape == (2, 6)


def test_generate_refusals():
    model = side_model()
    x = prompts()
    right = torch.ones_like(x)
    right[0, -2:] = 0
    with pytest.raises(ConfigError, match="prompts must be left-padded"):
        model.generate(x, right)
    with pytest.raises(ConfigError, match="max_new_tokens must be >= 1, got 0"):
        model.generate(x, max_new_tokens=0)
    with pytest.raises(UnsupportedModel, match="generate needs a Llama-like decoder wrapped for causal LM"):
        wrap_tiny("tiny-bert").generate(x)
    with pytest.raises(UnsupportedModel, match="generate needs a Llama-like decoder"):
        wrap_spec(num_labels=3).generate(x)

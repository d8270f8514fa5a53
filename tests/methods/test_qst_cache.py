"""QST with the trunk cache: the N frozen block outputs computed once per example and replayed.

Without a cache the side network runs interleaved with the backbone, block by block; with one, all block
outputs are computed first (epoch 1) or replayed (later epochs) and the side network then reads them. The
real rows are the same values in the same operations, so every loss must be bit-identical.
"""
from __future__ import annotations

import pytest
import torch

import memtune
from memtune.methods import ConfigError, config_for
from memtune.methods.common import TrunkCacheError

from .test_trunk_cache import LENGTHS, image_batch, text_batch

GROUPS = [[0, 1, 2], [3, 4, 5]]


def wrap(name, **opts):
    torch.manual_seed(0)
    opts.setdefault("r", 4)
    labels = None if name == "tiny-llama" else 3
    return memtune.wrap(memtune.load_model(name), config_for("qst", opts), num_labels=labels)


def batch_of(model, ids):
    if model.backbone.modality == "image":
        return image_batch(ids)
    b = text_batch(ids, [LENGTHS[e] for e in ids])
    if model.objective == "causal-lm":
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return b


def train(name, epochs=2, **opts):
    """AdamW over `epochs` epochs of GROUPS; returns (losses, block calls per epoch and block, model)."""
    m = wrap(name, **opts).train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    calls = [0] * m.backbone.num_layers
    for i, block in enumerate(m.backbone.blocks):
        block.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    losses, per_epoch = [], []
    torch.manual_seed(123)                                    # side dropout draws: the same in every run
    for _ in range(epochs):
        before = list(calls)
        for ids in GROUPS:
            loss = m(**batch_of(m, ids)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        per_epoch.append([c - b for c, b in zip(calls, before)])
    return losses, per_epoch, m


CASES = [("tiny-llama", {}), ("tiny-bert", {"trunk_dropout": False}),
         ("tiny-vit", {"downsample": "linear", "tap_storage": "int8"}), ("tiny-bert", {"trunk_dropout": False,
                                                                                  "downsample": "avgpool"})]


@pytest.mark.parametrize("name, opts", CASES, ids=["llama-lm", "bert", "vit-int8-linear", "bert-avgpool"])
def test_cached_losses_are_bit_identical_to_the_interleaved_form_over_two_epochs(name, opts):
    plain, plain_calls, pm = train(name, **opts)
    cached, cached_calls, cm = train(name, cache_trunk=True, **opts)
    assert cached == plain                                    # every step of both epochs, exactly
    assert plain[2:] != plain[:2]                             # training moved: the comparison is not vacuous
    N = pm.backbone.num_layers
    assert plain_calls == [[2] * N] * 2                       # the interleaved form runs every block each step
    assert cached_calls == [[2] * N, [0] * N]                 # epoch 2 never ran the trunk
    for (n, p), (n2, q) in zip(pm.trainable_named_parameters(), cm.trainable_named_parameters()):
        assert n == n2 and torch.equal(p, q), n               # the same trained weights
    cache = cm.trunk_cache
    assert cache.hits == 2 and len(cache) == 6
    d = pm.backbone.hidden_size
    tokens = 6 * 17 if name == "tiny-vit" else sum(LENGTHS.values())   # ViT: 16 patches + CLS per image
    # Per example: its real tokens × the N block outputs × d fp32 (the embedding and h_N's norm are recomputed).
    assert cm.cache_bytes == cache.nbytes == tokens * N * d * 4
    assert pm.cache_bytes == 0


def test_evaluation_neither_reads_nor_fills_the_cache():
    m = wrap("tiny-llama", cache_trunk=True).eval()
    batch = batch_of(m, [0, 1])
    with torch.no_grad():
        m(**batch)
    assert len(m.trunk_cache) == 0 and m.cache_bytes == 0
    m.train()
    m(**batch)
    assert len(m.trunk_cache) == 2


def test_changed_input_under_the_same_id_is_recomputed_or_refused():
    first = batch_of(wrap("tiny-llama"), [0, 1])
    changed = dict(first, input_ids=first["input_ids"].clone())
    changed["input_ids"][0, 2] = changed["input_ids"][0, 2] % 50 + 6    # another token, same id and length
    changed["labels"] = changed["input_ids"].masked_fill(changed["attention_mask"] == 0, -100)
    plain = wrap("tiny-llama").train()
    cached = wrap("tiny-llama", cache_trunk=True).train()
    cached(**first)
    with pytest.warns(UserWarning, match="the input of example_id 0 differs"):
        got = cached(**changed).logits
    real = changed["attention_mask"].bool()                   # padded rows: zero taps in the cached form
    assert torch.equal(got[real], plain(**changed).logits[real])   # recomputed, not replayed
    assert cached.trunk_cache.hits == 0 and cached.trunk_cache.mismatches == 1   # example 1 is unchanged
    again = cached(**changed).logits                          # the changed version is what is stored now
    assert cached.trunk_cache.hits == 1 and torch.equal(again, got)
    strict = wrap("tiny-llama", cache_trunk=True, cache_verify="strict").train()
    strict(**first)
    with pytest.raises(TrunkCacheError, match="cache_verify=strict refuses them"):
        strict(**changed)


def test_missing_example_ids_are_a_clear_error():
    m = wrap("tiny-vit", cache_trunk=True).train()
    batch = batch_of(m, [0, 1])
    del batch["example_id"]
    with pytest.raises(TrunkCacheError, match=r"cache_trunk=True needs batch\['example_id'\]"):
        m(**batch)


def test_trunk_dropout_with_a_cache_is_refused():
    # tiny-bert has dropout 0.1; trunk_dropout=true (the default) runs it in train mode.
    with pytest.raises(ConfigError, match="qst: cache_trunk needs a deterministic frozen trunk, but its dropout"):
        wrap("tiny-bert", cache_trunk=True)
    assert wrap("tiny-bert", cache_trunk=True, trunk_dropout=False).trunk_cache is not None
    for name in ("tiny-llama", "tiny-vit"):                   # no dropout in the backbone: accepted as is
        assert wrap(name, cache_trunk=True).trunk_cache is not None
    with pytest.raises(ConfigError, match="qst.cache_dir='x' is only used with cache_trunk=true"):
        config_for("qst", {"cache_dir": "x"})
    with pytest.raises(ConfigError, match="qst.cache_verify must be one of warn, strict"):
        config_for("qst", {"cache_trunk": True, "cache_verify": "never"})


def test_trunk_dropout_off_runs_the_backbone_in_eval_mode_and_restores_it():
    for trunk_dropout in (False, True):
        m = wrap("tiny-bert", trunk_dropout=trunk_dropout).train()
        modes = []
        for mod in (m.backbone.model.embeddings, *m.backbone.blocks):
            mod.register_forward_hook(lambda mod, a, o: modes.append(mod.training))
        m(**batch_of(m, [0, 1])).loss.backward()
        assert modes == [trunk_dropout] * (1 + m.backbone.num_layers)
        assert all(mod.training for mod in m.modules())          # every flag restored afterwards

"""The shared trunk cache: per-example taps replayed in later epochs, verified by an input checksum."""
from __future__ import annotations

import pytest
import torch

import memtune
from memtune.memory.measure import measure_training_memory
from memtune.methods import ConfigError, config_for
from memtune.methods.common import TrunkCache, TrunkCacheError, input_checksums

from .side_helpers import train_epochs


def _wrap(method, name, seed=0, **opts):
    torch.manual_seed(seed)
    return memtune.wrap(memtune.load_model(name), config_for(method, opts), num_labels=3)


def text_batch(ids_of, lengths, t=None, vocab=60):
    """Example e's tokens are fixed by e (seeded), whatever batch or padded length it lands in."""
    t = t or max(lengths)
    rows = [torch.randint(5, vocab, (32,), generator=torch.Generator().manual_seed(100 + e))[:t] for e in ids_of]
    ids = torch.stack(rows)
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor(ids_of) % 3,
            "example_id": torch.tensor(ids_of)}


def image_batch(ids_of):
    px = torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(200 + e)) for e in ids_of])
    return {"pixel_values": px, "labels": torch.tensor(ids_of) % 3, "example_id": torch.tensor(ids_of)}


LENGTHS = {0: 9, 1: 5, 2: 7, 3: 3, 4: 8, 5: 6}


def epoch_batches(name, groups):
    if name in ("tiny-vit", "tiny-dinov2"):
        return [image_batch(g) for g in groups]
    return [text_batch(g, [LENGTHS[e] for e in g]) for g in groups]


def run(method, name, epochs, **opts):
    """Train `epochs` (lists of batches) with AdamW; returns losses, trunk block-0 calls per epoch, model."""
    m = _wrap(method, name, **opts).train()
    losses, per_epoch = train_epochs(m, epochs)
    return losses, per_epoch, m


CASES = [("lst", "tiny-bert", {"trunk_dropout": False}), ("lst", "tiny-vit", {}), ("lst", "tiny-llama", {}),
         ("sherl", "tiny-bert", {"trunk_dropout": False}), ("sherl", "tiny-vit", {}),
         ("dtl", "tiny-bert", {}), ("dtl", "tiny-vit", {}),
         ("linear", "tiny-bert", {"trunk_dropout": False}), ("linear", "tiny-vit", {})]
GROUPS = [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("method, name, opts", CASES, ids=[f"{m}-{n}" for m, n, _ in CASES])
def test_cached_losses_are_bit_identical_over_two_epochs(method, name, opts):
    epochs = [epoch_batches(name, GROUPS)] * 2
    plain, plain_calls, _ = run(method, name, epochs, **opts)
    cached, cached_calls, m = run(method, name, epochs, cache_trunk=True, **opts)
    assert cached == plain                              # every step of both epochs, exactly
    assert plain[2:] != plain[:2]                       # training moved: the comparison is not vacuous
    assert plain_calls == [2, 2] and cached_calls == [2, 0]   # epoch 2 never ran the trunk
    assert m.trunk_cache.hits == 2 and len(m.trunk_cache) == 6
    assert m.cache_bytes == m.trunk_cache.nbytes > 0


def test_reshuffled_batches_replay_within_fp32_rounding():
    """Epoch 2 regroups the examples, so each text sits in a batch of another padded length (9 → 8, 7 → 9,
    ...): the replayed taps are those computed at the epoch-1 length. Real rows do not depend on the padded
    length mathematically (padded keys get weight exactly 0); numerically a kernel may sum over a longer
    key axis in another order, changing a tap by a few fp32 ulps (say ≤ 4·2⁻²⁴ ≈ 2.4e-7 relative). With
    an amplification ≤ 100 through the side path and 2 AdamW steps, the loss moves ≤ 2.4e-5 relative:
    the test asserts rtol 1e-4 (on this CPU's kernels the losses come out identical) and an exact epoch 1."""
    epochs = [epoch_batches("tiny-bert", GROUPS), epoch_batches("tiny-bert", [[0, 4, 2], [3, 1, 5]])]
    for method in ("lst", "sherl", "dtl", "linear"):
        opts = {} if method == "dtl" else {"trunk_dropout": False}
        plain, _, _ = run(method, "tiny-bert", epochs, **opts)
        cached, calls, m = run(method, "tiny-bert", epochs, cache_trunk=True, **opts)
        assert cached[:2] == plain[:2] and calls == [2, 0]
        torch.testing.assert_close(torch.tensor(cached), torch.tensor(plain), rtol=1e-4, atol=0)


def test_flipped_image_under_the_same_id_is_recomputed_not_replayed():
    """The augmentation case: epoch 2 shows the mirrored image under the same example id."""
    first = image_batch([0, 1])
    flipped = dict(first, pixel_values=first["pixel_values"].flip(-1))
    plain = _wrap("dtl", "tiny-vit").train()
    cached = _wrap("dtl", "tiny-vit", cache_trunk=True).train()
    cached(**first)
    with pytest.warns(UserWarning, match="the input of example_id 0 differs"):
        got = cached(**flipped).logits
    torch.testing.assert_close(got, plain(**flipped).logits, rtol=0, atol=0)
    assert cached.trunk_cache.hits == 0 and cached.trunk_cache.mismatches == 2
    again = cached(**flipped).logits                    # the flipped version is what is stored now
    assert cached.trunk_cache.hits == 1 and torch.equal(again, got)
    strict = _wrap("dtl", "tiny-vit", cache_trunk=True, cache_verify="strict").train()
    strict(**first)
    with pytest.raises(TrunkCacheError, match="cache_verify=strict refuses them"):
        strict(**flipped)


def test_trunk_dropout_is_refused_and_t5_is_refused():
    with pytest.raises(ConfigError, match="linear: cache_trunk needs a deterministic frozen trunk"):
        _wrap("linear", "tiny-bert", cache_trunk=True)
    for method in ("lst", "sherl"):
        with pytest.raises(ConfigError, match="cache_trunk needs a deterministic frozen trunk, but its dropout"):
            _wrap(method, "tiny-bert", cache_trunk=True)          # tiny-bert: dropout 0.1, trunk_dropout=true
        with pytest.raises(ConfigError, match="not t5"):
            _wrap(method, "tiny-t5", cache_trunk=True, trunk_dropout=False)
    _wrap("lst", "tiny-vit", cache_trunk=True)                   # ViT's dropout is 0: deterministic as is
    with pytest.raises(ConfigError, match="cannot be combined with trunk_dropout"):
        config_for("dtl", {"cache_trunk": True, "trunk_dropout": True})


def test_checksums_ignore_padding_but_not_position_or_content():
    a = text_batch([0, 1], [9, 5])
    b = text_batch([1, 0], [5, 9], t=12)                   # same texts, other order and padded length
    sa = input_checksums(a, ("input_ids", "token_type_ids"), a["attention_mask"])
    sb = input_checksums(b, ("input_ids", "token_type_ids"), b["attention_mask"])
    assert sa == sb[::-1] and sa[0] != sa[1]
    left = {"input_ids": a["input_ids"][1:].roll(4, 1), "attention_mask": a["attention_mask"][1:].roll(4, 1)}
    assert input_checksums(left, ("input_ids",), left["attention_mask"]) != sa[1:]   # shifted positions
    px = image_batch([0])
    assert input_checksums(px, ("pixel_values",), None) != input_checksums(
        {"pixel_values": px["pixel_values"].flip(-1)}, ("pixel_values",), None)


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_store_fetch_bf16_and_budget(where, tmp_path):
    directory = tmp_path if where == "disk" else None
    full = TrunkCache(10_000, directory)
    half = TrunkCache(10_000, directory, dtype=torch.bfloat16)
    rows = torch.randn(7, 2, 16)                          # two examples of 3 and 4 rows, K=2, D=16
    for c in (full, half):
        c.store([5, 6], [11, 12], rows, [3, 4])
    assert full.nbytes == 7 * 2 * 16 * 4 and half.nbytes == full.nbytes // 2
    assert torch.equal(full.fetch([6, 5], [12, 11], [4, 3]), torch.cat([rows[3:], rows[:3]]))
    assert torch.equal(half.fetch([5], [11], [3]), rows[:3].bfloat16())
    assert full.fetch([5, 7], [11, 0], [3, 1]) is None    # id 7 unknown: recompute
    with pytest.warns(UserWarning, match="example_id 5 differs"):
        assert full.fetch([5], [99], [3]) is None
    full.store([5], [99], rows[:3] + 1, [3])              # the changed input replaces the entry
    assert torch.equal(full.fetch([5], [99], [3]), rows[:3] + 1) and full.nbytes == 7 * 2 * 16 * 4
    with pytest.raises(TrunkCacheError, match="trunk cache budget too small: cache_max_bytes=10000"):
        full.store([8, 9], [1, 2], torch.randn(80, 2, 16), [40, 40])
    full.close()
    half.close()
    assert list(tmp_path.iterdir()) == []


def test_a_run_too_big_for_the_budget_stops_at_its_first_batch(tmp_path, capsys):
    """With the run's example count known, the first store projects the whole cache (per example × count) and
    refuses at once, naming the remedies; a run that fits stores as before."""
    cache = TrunkCache(10_000)
    cache.expected_examples = 100                          # 100 × (3 rows × 2 × 16 × 4 bytes) = 38,400 > 10,000
    with pytest.raises(TrunkCacheError, match=r"its 100 training examples need about .*cache_dtype=bf16"):
        cache.store([0, 1], [1, 2], torch.randn(6, 2, 16), [3, 3])
    assert len(cache) == 0
    cache.expected_examples = 20                           # 20 × 384 = 7,680 bytes: fits
    cache.store([0, 1], [1, 2], torch.randn(6, 2, 16), [3, 3])
    assert len(cache) == 2
    # End to end: memtune train refuses in the first step with exit 2, before any epoch's work is lost.
    from memtune.cli import main

    csv = tmp_path / "t.csv"
    csv.write_text("text,label\n" + "".join(f"film number {i},{i % 2}\n" for i in range(40)))
    rc = main(["train", "--model", "tiny-bert", "--task", f"csv:{csv}", "--method", "lst", "--cache-trunk", "true",
               "--trunk-dropout", "false", "--cache-max-bytes", "20000", "--batch-size", "4", "--max-length", "16",
               "--no-progress", "--out", str(tmp_path / "run")])
    assert rc == 2 and "training examples need about" in capsys.readouterr().err


def test_memory_report_counts_the_host_cache():
    m = _wrap("lst", "tiny-vit", cache_trunk=True).train()
    batch = image_batch([0, 1])
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    report = measure_training_memory(m, batch, opt, warmup=1, steps=1)
    assert report.host_cache_bytes == m.cache_bytes == 2 * 17 * 4 * 64 * 4   # 2 images × 17 tokens × 4 blocks


def test_a_cached_probe_stores_one_feature_row_per_example_and_matches_the_eval_mode_backbone():
    # The probe's cache holds the pooled features (feature_size values per example, whatever the text's
    # length), and trunk_dropout=false runs the backbone as in evaluation: training and eval logits agree.
    m = _wrap("linear", "tiny-bert", cache_trunk=True, trunk_dropout=False).train()
    batch = text_batch([0, 1, 2], [LENGTHS[e] for e in (0, 1, 2)])
    first = m(**batch).logits
    assert m.trunk_cache.row_shape == (1, m.feature_size) and m.trunk_cache.rows_used == 3
    replayed = m(**batch).logits
    assert m.trunk_cache.hits == 1 and torch.equal(replayed, first)
    assert m.backbone.training                        # eval mode only inside the probe's forward
    with torch.no_grad():
        evaluated = m.eval()(**{k: v for k, v in batch.items() if k != "example_id"}).logits
    torch.testing.assert_close(evaluated, first, rtol=0, atol=0)


def test_a_bf16_probe_cache_trains_on_the_rounded_features_from_the_first_epoch():
    m = _wrap("linear", "tiny-vit", cache_trunk=True, cache_dtype="bf16").train()
    batch = image_batch([0, 1, 2])
    first = m(**batch).logits                           # computed, stored in bf16, returned as stored
    assert m.trunk_cache.dtype == torch.bfloat16
    assert torch.equal(m(**batch).logits, first) and m.trunk_cache.hits == 1
    exact = _wrap("linear", "tiny-vit").train()(**batch).logits
    assert not torch.equal(first, exact)                # the rounding is real, and small:
    # each feature moves by at most bf16's unit roundoff 2⁻⁹ of itself, so logit c by ≤ 2⁻⁹·Σ_i |w_ci·f_i|
    # (+ fp32 rounding of the sums).
    feats = _wrap("linear", "tiny-vit").train().features(batch)                   # B×F, exact
    bound = 2 ** -9 * (feats.abs() @ m.head.weight.abs().T) + 1e-6                 # B×C
    assert ((first - exact).abs() <= bound).all()

"""QST side options: compact storage of the downsample's frozen input (tap_storage), the fused side
attention default, and the side head count.

Weight-gradient bound for tap_storage (per element of dW_A = Σ_calls gᵀ·x, x̂ the dequantized copy, R rows
per call; the same derivation as tests/methods/test_compact_taps.py):
    |dŴ − dW|_jk ≤ Σ_calls [ Σ_r |g_rj|·|x̂_rk − x_rk|  +  2(R+1)·2⁻²⁴·Σ_r |g_rj|·(|x_rk| + |x̂_rk − x_rk|) ]
    bf16: |x̂ − x| ≤ 2⁻⁸·|x|;  int8: |x̂ − x| ≤ absmax(x_r)/254·(1 + 2·2⁻²⁴)
The second term is fp32 accumulation (a γ_R bound for each of the two R-term sums, plus the sum of D_0's
two calls). It holds because the upstream gradient g is the same in both runs: the forward reads the full
x, so every other saved tensor, and hence every gradient reaching W_A's output, is bit-identical (asserted).
"""
from __future__ import annotations

import pytest
import torch

from memtune.memory.saved import count_saved_inside, saved_bytes
from memtune.methods import ConfigError, config_for
from memtune.methods.common import TapLinear, compact_bytes

from .side_helpers import batch_for
from .test_qst import make, randomize_side, wrap_tiny

EPS32 = 2.0 ** -24


def frozen_readers(model):
    """The maps that read a frozen backbone tap: W_A of each adapter/LoRA downsample, or the linear one."""
    return [getattr(ds, "down", ds) for ds in model.side.downsamples]


def run_recording(model, batch):
    """One forward and backward; returns (loss, saved bytes inside the readers, calls) with calls[i] the list
    of (x, g) per call of reader i: its frozen input and the gradient reaching its output."""
    readers = frozen_readers(model)
    calls = [[] for _ in readers]
    hooks = []
    for i, m in enumerate(readers):
        def record(mod, args, out, i=i):
            entry = [args[0].detach(), None]
            calls[i].append(entry)
            out.register_hook(lambda g: entry.__setitem__(1, g.detach()))
        hooks.append(m.register_forward_hook(record))
    with count_saved_inside(readers, model) as counter:
        loss = model(**batch).loss
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach(), counter.bytes, calls


CASES = [("llama-lm", "adapter"), ("llama-cls", "lora"), ("tiny-bert", "adapter"), ("tiny-vit", "linear")]


@pytest.mark.parametrize("kind, downsample", CASES, ids=[f"{k}-{d}" for k, d in CASES])
def test_tap_storage_saves_the_downsample_inputs_compactly(kind, downsample):
    runs = {}
    for storage in ("full", "bf16", "int8"):
        # Sigmoid mix: the side path reaches the output from the first step (paper form: only α moves).
        model = make(kind, downsample=downsample, mix="sigmoid", tap_storage=storage).eval()   # no dropout
        assert all(isinstance(m, TapLinear) and m.tap_storage == storage for m in frozen_readers(model))
        batch = batch_for(model)
        loss, nbytes, calls = run_recording(model, batch)
        grads = [m.weight.grad.clone() for m in frozen_readers(model)]
        assert all(p.grad is None for p in model.backbone.parameters())
        runs[storage] = (loss, nbytes, calls, grads)
    n_taps = model.backbone.num_layers + 1                     # embedding + every block output (D_0 twice)
    full_loss, full_bytes, full_calls, full_grads = runs["full"]
    shapes = [tuple(x.shape) for c in full_calls for x, _ in c]
    assert len(shapes) == n_taps and all(not x.requires_grad for c in full_calls for x, _ in c)
    assert full_bytes == sum(compact_bytes(s, "full") for s in shapes)
    for storage, factor in (("bf16", 2), ("int8", 4)):
        loss, nbytes, calls, grads = runs[storage]
        assert torch.equal(loss, full_loss)                   # the forward reads the full taps: exact
        assert nbytes == sum(compact_bytes(s, storage) for s in shapes)
        rows = sum(s[0] * s[1] for s in shapes)
        assert nbytes == full_bytes // factor + (4 * rows if storage == "int8" else 0)
        for i, (ref_calls, got_calls) in enumerate(zip(full_calls, calls)):
            bound = 0
            for (x, g), (x2, g2) in zip(ref_calls, got_calls):
                assert torch.equal(x, x2) and torch.equal(g, g2)     # the premise of the bound
                x, g = x.flatten(0, -2).abs(), g.flatten(0, -2).abs()   # R×d, R×k
                if storage == "bf16":
                    dx = 2.0 ** -8 * x
                else:
                    dx = (x.amax(-1, keepdim=True) / 254 * (1 + 2 * EPS32)).expand_as(x)
                R = x.shape[0]
                bound = bound + g.t() @ dx + 2 * (R + 1) * EPS32 * (g.t() @ (x + dx))
            err = (grads[i] - full_grads[i]).abs()
            assert (err <= bound).all(), (i, (err / bound).max())
        assert max((g - f).abs().max() for g, f in zip(grads, full_grads)) > 0   # the compact copy was used


def test_tap_storage_whole_step_saves_exactly_the_compacted_bytes():
    """The whole forward saves (N+1)·B·T·d·2 bytes less with bf16: each tap B×T×d fp32 → bf16."""
    out = {}
    for storage in ("full", "bf16"):
        model = make("llama-lm", tap_storage=storage).eval()
        batch = batch_for(model)
        out[storage] = saved_bytes(model, lambda: model(**batch).loss)
    B, T = batch["input_ids"].shape
    assert out["full"] - out["bf16"] == (model.backbone.num_layers + 1) * B * T * 64 * 2


def test_tap_storage_options_and_refusals():
    assert config_for("qst", {}).tap_storage == "full"
    assert config_for("qst", {"tap_storage": "int8", "downsample": "linear"}).tap_storage == "int8"
    with pytest.raises(ConfigError, match="qst.tap_storage must be one of full, bf16, int8; got 'fp8'"):
        config_for("qst", {"tap_storage": "fp8"})
    for pool in ("avgpool", "maxpool"):
        with pytest.raises(ConfigError, match=f"tap_storage=bf16 has no effect with downsample={pool}"):
            config_for("qst", {"tap_storage": "bf16", "downsample": pool})


# -- side attention --------------------------------------------------------------------------------------------------
def test_side_attention_defaults_to_fused_sdpa_without_probability_dropout():
    bert = wrap_tiny("tiny-bert").side_config
    assert (bert._attn_implementation, bert.attention_probs_dropout_prob, bert.hidden_dropout_prob) == \
        ("sdpa", 0.0, 0.1)                                     # hidden dropout stays the backbone's
    vit = wrap_tiny("tiny-vit").side_config
    assert (vit._attn_implementation, vit.attention_probs_dropout_prob) == ("sdpa", 0.0)
    llama = wrap_tiny("tiny-llama", None, r=4).side_config
    assert (llama._attn_implementation, llama.attention_dropout) == ("sdpa", 0.0)
    eager = wrap_tiny("tiny-bert", attention="eager")
    assert (eager.side_config._attn_implementation, eager.side_config.attention_probs_dropout_prob) == ("eager", 0.1)
    assert eager.backbone.config._attn_implementation == "eager"          # the backbone is left alone
    chosen = wrap_tiny("tiny-bert", attention_dropout=0.2).side_config
    assert (chosen._attn_implementation, chosen.attention_probs_dropout_prob) == ("sdpa", 0.2)
    with pytest.raises(ConfigError, match=r"qst.attention_dropout must be none or in \[0, 1\), got 1.0"):
        config_for("qst", {"attention_dropout": 1})


def test_mpnet_side_attention_stays_eager():
    import memtune
    from transformers import MPNetConfig, MPNetModel

    hf = MPNetModel(MPNetConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128))
    hf.config._attn_implementation = "eager"
    model = memtune.wrap(hf, config_for("qst", {"r": 4}), num_labels=2)
    assert model.side_config._attn_implementation == "eager"


@pytest.mark.parametrize("kind", ["tiny-bert", "tiny-vit", "llama-lm"])
def test_fused_side_attention_matches_eager_and_stores_no_attention_maps(kind):
    """Side dropout off, fp32, no padding (so no T×T mask either). Tolerance: the fused kernel sums the softmax
    and P·V over keys in another order than eager (≤ T·2⁻²⁴ ≈ 1e-6 relative per attention at T ≤ 17), through
    ≤ 4 side blocks forward and backward: well below rtol 1e-4 (atol 1e-5 × the largest gradient entry, for
    entries that cancel to about zero)."""
    grads, maps, logits = {}, {}, {}
    for attention in ("eager", "sdpa"):
        model = make(kind, attention=attention, mix="sigmoid").eval()
        randomize_side(model)
        batch = batch_for(model)
        if "attention_mask" in batch:
            batch["attention_mask"].fill_(1)
            batch["input_ids"].clamp_(min=5)
            if model.objective == "causal-lm":
                batch["labels"] = batch["input_ids"].clone()
        T = model.backbone.embed(batch)[0].shape[1]
        shapes, inside, hooks = [], [False], []
        for block in model.side.blocks:                        # record saved shapes inside side blocks only
            hooks.append(block.register_forward_pre_hook(lambda m, a: inside.__setitem__(0, True)))
            hooks.append(block.register_forward_hook(lambda m, a, o: inside.__setitem__(0, False)))

        def pack(t):
            if inside[0]:
                shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**batch)
        for h in hooks:
            h.remove()
        out.loss.backward()
        assert shapes                                          # the side blocks did save tensors
        maps[attention] = [s for s in shapes if len(s) >= 2 and s[-2:] == (T, T)]
        logits[attention] = out.logits.detach()
        grads[attention] = {n: p.grad.clone() for n, p in model.trainable_named_parameters()}
    assert maps["eager"] and not maps["sdpa"], maps["sdpa"]
    torch.testing.assert_close(logits["sdpa"], logits["eager"], rtol=1e-4, atol=1e-5)
    scale = max(g.abs().max().item() for g in grads["eager"].values())
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["sdpa"][n], g, rtol=1e-4, atol=1e-5 * scale, msg=n)


# -- side heads ------------------------------------------------------------------------------------------------------
def assert_side_blocks_train_alone(model):
    """One training step with the side path mixed in (α = 0.5): every side-block weight gets a non-zero
    gradient and the frozen backbone none."""
    model.train()
    with torch.no_grad():
        model.mix.weight.fill_(0.5)
    model(**batch_for(model)).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.trainable_named_parameters()
               if n.startswith("side.blocks."))


def test_side_heads_sets_the_side_head_count():
    bert = wrap_tiny("tiny-bert", side_heads=1)                # r=16: d' = 4, one head of 4 instead of 4 of 1
    assert (bert.r, bert.side_config.num_attention_heads, bert.side_config.hidden_size) == (16, 1, 4)
    vit = wrap_tiny("tiny-vit", r=2, side_heads=2)             # d' = 32: 2 heads of 16
    c = vit.side_config
    assert (c.num_attention_heads, c.head_dim, c.hidden_size) == (2, 16, 32)
    for model in (bert, vit):
        assert model.backbone.config.num_attention_heads == 4
        assert_side_blocks_train_alone(model)
    assert wrap_tiny("tiny-bert").side_config.num_attention_heads == 4       # default: the backbone's H
    with pytest.raises(ConfigError, match=r"qst.r=16 .*side width d/r=4 is not divisible by the 3 side heads"):
        wrap_tiny("tiny-bert", r=16, side_heads=3)
    with pytest.raises(ConfigError, match="qst.side_heads=2: another head count than the backbone's"):
        wrap_tiny("tiny-t5", side_heads=2)
    with pytest.raises(ConfigError, match="qst.side_heads must be a positive head count"):
        config_for("qst", {"side_heads": 0})


def test_llama_side_heads_keep_the_kv_grouping_where_they_can():
    # tiny llama: d = 64, H = 4, KV = 2 (groups of 2); QST's default r = 4 gives d' = 16.
    for heads, kv, head_dim in ((None, 2, 4), (2, 1, 8), (1, 1, 16)):   # H' = 1: 1·2/4 is no whole count
        model = make("llama-lm", side_heads=heads)
        c = model.side_config
        assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (16, heads or 4, kv,
                                                                                             head_dim)
        block = model.side.blocks[0].self_attn
        assert block.k_proj.out_features == kv * head_dim and block.q_proj.out_features == 16
        assert_side_blocks_train_alone(model)
    with pytest.raises(ConfigError, match=r"side head width d/\(r·H\)=1 is odd"):     # d' = 32 over 32 heads
        make("llama-lm", r=2, side_heads=32)


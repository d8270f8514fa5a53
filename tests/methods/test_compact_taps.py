"""Compact saved taps: a linear map over a frozen input that keeps its saved copy in bf16 or int8.

Bounds (per element of the weight gradient dW = gᵀ·x over R rows, x̂ the dequantized copy):
    |dŴ − dW|_jk ≤ Σ_r |g_rj|·|x̂_rk − x_rk| + (fp32 accumulation of both products)
    bf16: |x̂ − x| ≤ 2⁻⁸·|x|             (8 significand bits, round to nearest: half an ulp = 2⁻⁸ relative)
    int8: |x̂ − x| ≤ absmax(x_r)/127/2   (round to nearest of x/s, s = absmax/127; plus fp32 rounding of q·s)
    fp32 accumulation: each of the two R-term sums is off by ≤ R·2⁻²⁴·Σ_r |g_rj||x_rk| (a γ_R bound).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memtune
from memtune.memory.saved import SavedTensorCounter, count_saved_inside
from memtune.methods import config_for
from memtune.methods.common import TapLinear, compact_bytes, frozen_input_linear

EPS32 = 2.0 ** -24


def _case(seed=0, rows=(3, 17), n_in=24, n_out=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, n_in, generator=g) * torch.logspace(-2, 1, n_in)   # mixed magnitudes
    w = torch.randn(n_out, n_in, generator=g, requires_grad=True)
    b = torch.randn(n_out, generator=g, requires_grad=True)
    up = torch.randn(*rows, n_out, generator=g)                                # dL/dy
    return x, w, b, up


def _grads(fn, x, w, b, up):
    w.grad = b.grad = None
    y = fn(x, w, b)
    (y * up).sum().backward()
    return y.detach(), w.grad.clone(), b.grad.clone()


def test_full_storage_is_exactly_linear():
    x, w, b, up = _case()
    ref = _grads(F.linear, x, w, b, up)
    got = _grads(lambda *a: frozen_input_linear(*a, storage="full"), x, w, b, up)
    for r, o in zip(ref, got):
        assert torch.equal(r, o)


@pytest.mark.parametrize("storage", ["bf16", "int8"])
def test_compact_storage_weight_gradient_within_the_quantisation_bound(storage):
    x, w, b, up = _case()
    y_ref, gw_ref, gb_ref = _grads(F.linear, x, w, b, up)
    y, gw, gb = _grads(lambda *a: frozen_input_linear(*a, storage=storage), x, w, b, up)
    assert torch.equal(y, y_ref)                      # forward from the full x: exact
    assert torch.equal(gb, gb_ref)                    # the bias gradient does not read x
    g2, x2 = up.reshape(-1, up.shape[-1]).abs(), x.reshape(-1, x.shape[-1]).abs()
    R = x2.shape[0]
    if storage == "bf16":
        dx = 2.0 ** -8 * x2                                                   # R×in
    else:
        dx = (x2.amax(-1, keepdim=True) / 127 / 2).expand_as(x2) * (1 + 2 * EPS32)
    bound = g2.t() @ dx + 2 * R * EPS32 * (g2.t() @ x2)                      # out×in
    err = (gw - gw_ref).abs()
    assert (err <= bound).all(), (err / bound).max()
    assert err.max() > 0                              # the compact copy was really used


def test_int8_row_of_zeros_and_input_that_needs_grad():
    x = torch.zeros(2, 5, 8)
    w = torch.randn(3, 8, requires_grad=True)
    frozen_input_linear(x, w, None, "int8").sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    with pytest.raises(RuntimeError, match="only for frozen taps"):
        frozen_input_linear(torch.randn(2, 8, requires_grad=True), w, None, "bf16")
    # TapLinear falls back to nn.Linear when its input is not frozen (the input gradient is needed then).
    layer = TapLinear(8, 3, tap_storage="int8")
    xin = torch.randn(2, 8, requires_grad=True)
    layer(xin).sum().backward()
    assert xin.grad is not None
    with pytest.raises(ValueError, match="tap_storage must be one of full, bf16, int8"):
        TapLinear(8, 3, tap_storage="fp8")


@pytest.mark.parametrize("storage, factor", [("bf16", 2), ("int8", 4)])
def test_saved_bytes_of_the_input_fall_by_the_stated_factor(storage, factor):
    x, w, b, _ = _case(rows=(4, 32), n_in=64)
    counts = {}
    for s in ("full", storage):
        counter = SavedTensorCounter()
        counter.param_storages = {w.untyped_storage().data_ptr(), b.untyped_storage().data_ptr()}
        with counter():
            frozen_input_linear(x, w, b, s)
        counts[s] = counter.bytes
    assert counts["full"] == x.numel() * 4 == compact_bytes(tuple(x.shape), "full")
    assert counts[storage] == compact_bytes(tuple(x.shape), storage)
    rows = x.numel() // x.shape[-1]
    assert counts[storage] == counts["full"] // factor + (4 * rows if storage == "int8" else 0)


# -- in the side methods ---------------------------------------------------------------------------------------
def _wrap(method, name, **opts):
    torch.manual_seed(0)
    return memtune.wrap(memtune.load_model(name), config_for(method, opts), num_labels=2)


def _batch(model, b=3, t=12):
    g = torch.Generator().manual_seed(1)
    if model.backbone.modality == "image":
        return {"pixel_values": torch.randn(b, 3, 32, 32, generator=g), "labels": torch.arange(b) % 2}
    ids = torch.randint(5, 60, (b, t), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(b) % 2}


def _frozen_input_maps(model, batch):
    """The TapLinear modules whose input is a frozen tap (found by one forward with hooks)."""
    found, hooks = [], []
    for m in model.modules():
        if isinstance(m, TapLinear):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args: found.append(mod) if not args[0].requires_grad and mod not in found else None))
    model(**batch)                                    # with grad: later inputs do require it
    for h in hooks:
        h.remove()
    return found


METHODS = [("lst", "tiny-bert", {"dropout": 0.0}), ("lst", "tiny-vit", {}), ("sherl", "tiny-bert", {}),
           ("sherl", "tiny-vit", {"projection": "gated"}), ("dtl", "tiny-bert", {}), ("dtl", "tiny-vit", {})]


@pytest.mark.parametrize("method, name, opts", METHODS, ids=[f"{m}-{n}" for m, n, _ in METHODS])
def test_side_method_taps_saved_compactly(method, name, opts):
    """Inside the maps that read frozen taps the saved bytes fall 2× (bf16) / ~4× (int8); the loss is the
    same (the forward reads the full taps) and no gradient reaches the backbone."""
    saved, losses, grads = {}, {}, {}
    for storage in ("full", "bf16", "int8"):
        model = _wrap(method, name, tap_storage=storage, **opts).eval()   # eval: no dropout, same draws
        if method == "dtl":                           # B_i starts at zero, so A_i would get no gradient
            g = torch.Generator().manual_seed(2)
            with torch.no_grad():
                for read in model.reads.values():
                    read.up.weight.copy_(torch.randn(read.up.weight.shape, generator=g) * 0.1)
        batch = _batch(model)
        taps = _frozen_input_maps(model, batch)
        assert taps and all(t.tap_storage == storage for t in taps), "no map reads a frozen tap"
        with count_saved_inside(taps, model) as counter:
            loss = model(**batch).loss
        loss.backward()
        saved[storage], losses[storage] = counter.bytes, loss.item()
        grads[storage] = torch.cat([p.grad.flatten() for p in (t.weight for t in taps)])
        assert all(p.grad is None for p in model.backbone.parameters())
    assert losses["bf16"] == losses["int8"] == losses["full"]
    assert saved["bf16"] * 2 == saved["full"]
    assert saved["full"] / 4 < saved["int8"] < saved["full"] / 3.5        # 1 byte + a 4-byte scale per row
    # Compact copies change the weight gradients only slightly (bounded per element above).
    rel = {s: ((grads[s] - grads["full"]).norm() / grads["full"].norm()).item() for s in ("bf16", "int8")}
    assert 0 < rel["bf16"] < 2 ** -7 and 0 < rel["int8"] < 2 ** -5, rel


def test_lst_whole_step_saves_less_with_compact_taps():
    """The whole LST forward saves Σ taps·2 bytes less with bf16 (each tap: B×T×d fp32 → bf16)."""
    from memtune.memory.saved import saved_bytes

    out = {}
    for storage in ("full", "bf16"):
        model = _wrap("lst", "tiny-bert", tap_storage=storage, dropout=0.0).eval()
        batch = _batch(model)
        out[storage] = saved_bytes(model, lambda: model(**batch).loss)
    n_taps = 1 + model.backbone.num_layers                       # embedding output + every kept block
    tap_bytes = 3 * 12 * model.backbone.hidden_size * 4
    assert out["full"] - out["bf16"] == n_taps * tap_bytes // 2

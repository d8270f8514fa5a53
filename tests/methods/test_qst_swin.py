"""QST on a hierarchical backbone (tiny Swin: 32 px, patch 2, blocks 0..1 at width 16 on a 16×16 grid, blocks 2..3 at
width 32 on 8×8, heads 2 / 4, window 4): a staged side network with exact widths d'_s = C_s/r (docs/methods/qst.md
"Swin"). The backbone is fp32 here except in the NF4 check."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import memtune
from memtune.cli import main
from memtune.memory.saved import count_saved_inside
from memtune.methods import ConfigError, config_for
from memtune.models import load_model

from ..conftest import has_package
from .side_helpers import assert_quantized_start_and_training, fit_fixed_batch

TOKENS = (16 * 16, 8 * 8)               # tokens per stage
WIDTHS = (16, 32)                       # C_s
HEADS = (2, 4)
STAGE_OF = (0, 0, 1, 1)
K = 16                                  # the adapter rank (default)
CLASSES = 3


def wrap(num_labels=CLASSES, seed=0, **opts):
    opts.setdefault("r", 2)
    torch.manual_seed(seed)
    return memtune.wrap(load_model("tiny-swin"), config_for("qst", opts), num_labels=num_labels)


def pixels(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(B, 3, 32, 32, generator=g), "labels": torch.arange(B) % CLASSES}


def frozen_modules(model):
    """Every backbone block and the frozen patch merging between the stages."""
    bb = model.backbone
    return list(bb.blocks) + list(bb.stage_merges().values())


def randomize_side(model, seed=5):
    """Random weights everywhere in the side network (not the mix), so a check cannot pass by zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.side.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def side_block_count(w, heads, window=4, mlp_ratio=4):
    """A SwinLayer at width w: two LayerNorms, q/k/v/o with biases, the (2W−1)²×H table, fc1/fc2 with biases."""
    ff = mlp_ratio * w
    return 2 * 2 * w + 4 * (w * w + w) + (2 * window - 1) ** 2 * heads + (w * ff + ff) + (ff * w + w)


def side_widths(r):
    return tuple(c // r for c in WIDTHS)


# -- 1. the start is the backbone -------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [2, 8])
def test_paper_mix_starts_at_the_backbone_for_any_side_weights(r):
    model = wrap(r=r).eval()
    randomize_side(model)
    batch = pixels()
    bb = model.backbone
    with torch.no_grad():
        h, ctx = bb(batch)                                         # B×64×32, the final-normed last stage
        expected = bb.pool(h, ctx)                                 # B×32
        features = model.features(batch)
        logits = model(**batch).logits
        hf = bb.model(pixel_values=batch["pixel_values"]).last_hidden_state.mean(1)     # HF's pooler, by hand
    # α = 1: o = 1·h_N + 0·u = h_N exactly in floating point (u is finite): features and logits are bit-identical.
    assert torch.equal(features, expected) and torch.equal(logits, model.head(expected))
    # HF's own forward (fp32, 4 blocks and one merging, the same ops in the same order): equal to rounding.
    torch.testing.assert_close(features, hf, rtol=1e-5, atol=1e-6)
    assert torch.all(model.mix.weight == 1)


# -- 2. no gradient into the backbone, no graph in it --------------------------------------------------------------
@pytest.mark.parametrize("downsample", ["adapter", "avgpool"])
def test_backbone_gets_no_grad_and_records_no_graph(downsample):
    model = wrap(downsample=downsample).train()
    frozen = frozen_modules(model)
    assert set(map(id, model.graph_free_blocks())) == set(map(id, frozen))
    outputs = []
    hooks = [m.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for m in frozen]
    with count_saved_inside(frozen, model) as inside:
        loss = model(**pixels()).loss
    for h in hooks:
        h.remove()
    loss.backward()
    assert inside.count == 0 and inside.bytes == 0
    assert len(outputs) == 5 and all(o.grad_fn is None and not o.requires_grad for o in outputs)   # 4 blocks, 1 merge
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())


# -- 3. the paper form trains the whole side network once the mix has moved ------------------------------------------
@pytest.mark.parametrize("opts", [{}, {"gate": "scalar"}, {"r": 8, "downsample": "linear"}])
def test_every_side_parameter_gets_a_gradient_once_the_mix_has_moved(opts):
    model = wrap(**opts).train()
    model(**pixels()).loss.backward()
    # α = 1: ∂o/∂u = 1 − α = 0, so the first step reaches only α and the head.
    assert model.mix.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    assert all(torch.all(p.grad == 0) for n, p in model.named_parameters() if n.startswith("side."))
    torch.optim.SGD([p for _, p in model.trainable_named_parameters()], lr=0.1).step()
    model.zero_grad(set_to_none=True)
    model(**pixels()).loss.backward()
    names = [n for n, _ in model.trainable_named_parameters()]
    assert any(n.startswith("side.transitions.1.") for n in names)
    for n, p in model.trainable_named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


# -- 4. shapes and the trainable count -------------------------------------------------------------------------------
@pytest.mark.parametrize("r", [1, 2, 4, 8])
def test_side_widths_shapes_and_the_trainable_count(r):
    model = wrap(r=r)
    side, ds = model.side, side_widths(r)
    assert model.r == r and model.side_config.side_stage_widths == ds        # exact: C_s / r
    for i in range(4):
        s = STAGE_OF[i]
        blk = side.blocks[i]
        assert blk.layernorm_before.normalized_shape == (ds[s],)
        assert blk.attention.num_attention_heads == HEADS[s]                   # heads kept per stage
        assert blk.mlp.fc1.out_features == 4 * ds[s]
        down = side.downsamples[i]
        assert (down.down.in_features, down.down.out_features, down.up.out_features) == (WIDTHS[s], K, ds[s])
        assert side.gates[i].shape == (ds[s],) and torch.all(side.gates[i] == 0.5)   # vector gates, d'_s wide
    assert isinstance(side.gates, nn.ParameterList) and len(side.gates) == 4
    assert sorted(side.transitions) == ["1"]                                   # after the last block of stage 0
    merge = side.transition(1)
    assert (merge.norm.normalized_shape, merge.reduction.in_features, merge.reduction.out_features) == \
        ((4 * ds[0],), 4 * ds[0], 2 * ds[0]) and merge.reduction.bias is None
    assert side.norm.normalized_shape == (ds[1],)
    assert (side.up.in_features, side.up.out_features) == (ds[1], 32) and model.mix.weight.shape == (32,)

    d_of = [ds[STAGE_OF[i]] for i in range(4)]
    expected = (sum(K * (WIDTHS[STAGE_OF[i]] + d_of[i]) + 2 * d_of[i] for i in range(4))   # D_0..D_3 (adapters)
                + sum(d_of)                                                   # vector gates
                + sum(side_block_count(d_of[i], HEADS[STAGE_OF[i]]) for i in range(4))
                + 2 * 4 * ds[0] + 4 * ds[0] * 2 * ds[0]                       # side patch merging
                + 2 * ds[1]                                                   # side final norm
                + ds[1] * 32 + 32                                             # Up
                + 32                                                          # α
                + 32 * CLASSES + CLASSES)                                     # head
    assert sum(p.numel() for _, p in model.trainable_named_parameters()) == expected


def test_other_gates_and_downsamples_count_from_their_shapes():
    ds = side_widths(2)
    scalar = wrap(gate="scalar").side
    assert isinstance(scalar.gates, nn.Parameter) and scalar.gates.shape == (4, 1) and torch.all(scalar.gates == 0)
    linear = wrap(downsample="linear").side
    assert [sum(p.numel() for p in d.parameters()) for d in linear.downsamples] == \
        [WIDTHS[STAGE_OF[i]] * ds[STAGE_OF[i]] for i in range(4)]
    pooled = wrap(downsample="avgpool")
    assert not any(n.startswith("side.downsamples.") for n, _ in pooled.trainable_named_parameters())
    h = torch.randn(2, 64, 32)
    torch.testing.assert_close(pooled.side.downsamples[3](h), h.unflatten(-1, (16, 2)).mean(-1), rtol=0, atol=0)


def test_downsamples_read_in_stage_outputs_and_d0_is_used_twice():
    model = wrap().eval()
    side, ins, calls, states = model.side, {}, [0] * 4, {}

    def record(i):
        def hook(_module, args):
            calls[i] += 1
            ins.setdefault(i, []).append(args[0])
        return hook

    for i, m in enumerate(side.downsamples):
        m.register_forward_pre_hook(record(i))
    for i, b in enumerate(side.blocks):
        b.register_forward_hook(lambda m, a, o, i=i: states.__setitem__(i, o[0].shape))
    side.transition(1).register_forward_hook(lambda m, a, o: states.update(merge_in=a[0].shape, merge_out=o.shape))
    batch = pixels()
    with torch.no_grad():
        out = model(**batch)
    assert calls == [2, 1, 1, 1] and out.logits.shape == (2, CLASSES)   # D_0: the embedding and block 0's output
    assert [tuple(ins[i][-1].shape) for i in range(4)] == [(2, 256, 16), (2, 256, 16), (2, 64, 32), (2, 64, 32)]
    assert [tuple(states[i]) for i in range(4)] == [(2, 256, 8), (2, 256, 8), (2, 64, 16), (2, 64, 16)]
    assert states["merge_in"] == (2, 256, 8) and states["merge_out"] == (2, 64, 16)   # tokens /4, width ×2
    bb = model.backbone
    with torch.no_grad():
        e, ctx = bb.embed(batch)
        h1 = bb.run_block_in_stage(1, bb.run_block(0, e, ctx), ctx)
    assert torch.equal(ins[0][0], e)                    # D_0 on the embedding output (C_0 → d'_0)
    assert torch.equal(ins[1][0], h1)                   # D_1 on block 1's output before the frozen merging


# -- options -------------------------------------------------------------------------------------------------------------
def test_side_checkpointing_gives_the_same_loss_and_gradients():
    runs = {}
    for ckpt in (False, True):
        model = wrap(side_checkpointing=ckpt, mix="sigmoid").train()        # sigmoid: every gradient from step 1
        loss = model(**pixels()).loss
        loss.backward()
        runs[ckpt] = (loss.detach(), {n: p.grad.clone() for n, p in model.trainable_named_parameters()})
    (l0, g0), (l1, g1) = runs[False], runs[True]
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:                                        # the same fp32 arithmetic replayed: equal to rounding
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("options,fragment", [
    ({"cache_trunk": True, "trunk_dropout": False}, "qst.cache_trunk is not supported on swin"),
    ({"side_heads": 2}, "side_heads=2"),
    ({"r": 16}, r"qst.r=16 does not fit this swin backbone: stage 0's side width 16/r=1 is not divisible by its 2 "
                r"attention heads \(kept\); r values that fit: 1, 2, 4, 8$"),
    ({"r": 3}, "stage 0's width 16 is not divisible by r=3"),
])
def test_bad_options_are_refused(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        wrap(**options)


def test_the_default_r_is_lowered_to_fit_every_stage():
    with pytest.warns(UserWarning, match="r=16 does not fit .* using r=8"):
        model = wrap(r=None)
    assert model.r == 8 and model.side_config.side_stage_widths == (2, 4)
    assert "swin" in memtune.METHODS["qst"].supported_families()


@pytest.mark.skipif(not has_package("bitsandbytes"), reason="bitsandbytes not installed")
def test_trains_on_an_nf4_backbone():
    """qst+nf4 on Swin: every block linear becomes NF4 (the patch mergings between stages are not blocks and stay
    fp32, as the patch embedding does); QST still starts at the quantized backbone's output and trains without a
    gradient into it."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = memtune.wrap(load_model("tiny-swin"), config_for("qst", {"r": 2}), num_labels=CLASSES, techniques="nf4")
    bb = model.backbone
    linears = [m for b in bb.blocks for m in b.modules() if isinstance(m, (nn.Linear, bnb.nn.Linear4bit))]
    assert len(linears) == 4 * 6 and all(isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_type == "nf4"
                                         for m in linears)            # q, k, v, o, fc1, fc2 per block
    batch = pixels(B=4)
    assert_quantized_start_and_training(model, batch)


# -- 5. CLI: train, eval, save/load --------------------------------------------------------------------------------
def test_cli_trains_and_evaluates_the_saved_adapter(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-swin", "--task", str(image_folder), "--method", "qst", "--max-steps", "2",
                 "--batch-size", "4", "--test-limit", "4", "--no-progress", "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert json.loads((run / "adapter_config.json").read_text())["method"] == "qst"
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-swin", "--adapter", str(run), "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["accuracy"] == metrics["accuracy"]


def test_save_and_load_give_bit_identical_outputs(tmp_path):
    model = wrap(num_labels=2, mix="sigmoid").train()
    batch = {**pixels(), "labels": torch.tensor([0, 1])}
    fit_fixed_batch(model, batch, lr=1e-2, steps=2)                 # trained weights to save
    model.eval().save_pretrained(tmp_path / "saved")
    torch.manual_seed(123)                                  # a different fresh init: the load must overwrite it
    loaded = memtune.load("tiny-swin", tmp_path / "saved").eval()
    assert loaded.method_config == model.method_config
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)

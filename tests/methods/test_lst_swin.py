"""LST on a hierarchical backbone (tiny Swin: 32 px, patch 2, blocks 0..1 at width 16 on a 16×16 grid, blocks 2..3 at
width 32 on 8×8, heads 2 / 4, window 4): a staged side network (docs/methods/lst.md "Swin")."""
from __future__ import annotations

import json

import pytest
import torch

import memtune
from memtune.cli import main
from memtune.memory.saved import count_saved_inside
from memtune.methods import ConfigError, config_for
from memtune.models import load_model

from .side_helpers import assert_pruning_records_hold

GRID_TOKENS = (16 * 16, 8 * 8)          # tokens per stage
WIDTHS = (16, 32)                       # C_s
HEADS = (2, 4)
STAGE_OF = (0, 0, 1, 1)


def wrap(num_labels=3, seed=0, **opts):
    torch.manual_seed(seed)
    return memtune.wrap(load_model("tiny-swin"), config_for("lst", opts), num_labels=num_labels)


def pixels(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(B, 3, 32, 32, generator=g), "labels": torch.arange(B) % 3}


def frozen_modules(model):
    """Every backbone block and the frozen patch merging between the stages."""
    bb = model.backbone
    return list(bb.blocks) + list(bb.stage_merges().values())


def side_block_count(w, heads, window=4, mlp_ratio=4):
    """A SwinLayer at width w: two LayerNorms, q/k/v/o with biases, the (2W−1)²×H table, fc1/fc2 with biases."""
    ff = mlp_ratio * w
    return 2 * 2 * w + 4 * (w * w + w) + (2 * window - 1) ** 2 * heads + (w * ff + ff) + (ff * w + w)


# -- 1. shapes and the trainable count ---------------------------------------------------------------------------
@pytest.mark.parametrize("r,side", [(8, (2, 4)), (2, (8, 16))])
def test_side_widths_per_stage_and_the_trainable_count(r, side):
    model = wrap(r=r)
    stack = model.output_stack
    assert model.side_configs["encoder"].side_stage_widths == side   # d'_s = H_s·round(C_s/(r·H_s))
    for i in range(4):
        s = STAGE_OF[i]
        blk = stack.block(i)
        assert blk.layernorm_before.normalized_shape == (side[s],)
        assert blk.attention.num_attention_heads == HEADS[s]           # heads kept, per-head width /r
        assert blk.mlp.fc1.out_features == 4 * side[s]
        lad = stack.ladders[str(i)]
        assert (lad.in_features, lad.out_features) == (WIDTHS[s], side[s])
    assert (stack.ladders["embed"].in_features, stack.ladders["embed"].out_features) == (16, side[0])
    assert sorted(stack.transitions) == ["1"]                           # after the last block of stage 0
    merge = stack.transition(1)
    assert (merge.norm.normalized_shape, merge.reduction.in_features, merge.reduction.out_features) == \
        ((4 * side[0],), 4 * side[0], 2 * side[0])
    assert merge.reduction.bias is None
    assert (model.up.in_features, model.up.out_features) == (side[1], 32)

    expected = (16 * side[0] + side[0]                                 # W0
                + sum(WIDTHS[STAGE_OF[i]] * side[STAGE_OF[i]] + side[STAGE_OF[i]] for i in range(4))   # ladders
                + 4                                                    # gates
                + sum(side_block_count(side[STAGE_OF[i]], HEADS[STAGE_OF[i]]) for i in range(4))
                + 2 * 4 * side[0] + 4 * side[0] * 2 * side[0]          # side patch merging
                + 2 * side[1]                                          # side final norm
                + side[1] * 32 + 32                                    # W_up
                + 32 * 3 + 3)                                          # head
    assert sum(p.numel() for _, p in model.trainable_named_parameters()) == expected


def test_ladders_read_in_stage_outputs_and_the_side_transition_merges_the_grid():
    model = wrap(r=2).eval()
    stack, seen = model.output_stack, {}
    for i in range(4):
        stack.ladders[str(i)].register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(f"ladder{i}", a[0].shape))
    stack.transition(1).register_forward_hook(lambda m, a, o: seen.update(merge_in=a[0].shape, merge_out=o.shape))
    stack.block(2).register_forward_pre_hook(lambda m, a: seen.__setitem__("block2_in", a[0].shape))
    with torch.no_grad():
        model.features(pixels())
    # Block 1 ends stage 0: its ladder reads the 16×16 grid at width 16, before the frozen patch merging.
    assert [seen[f"ladder{i}"] for i in range(4)] == [(2, 256, 16), (2, 256, 16), (2, 64, 32), (2, 64, 32)]
    assert seen["merge_in"] == (2, 256, 8) and seen["merge_out"] == (2, 64, 16)   # tokens /4, width ×2
    assert seen["block2_in"] == (2, 64, 16)
    # The ladder of block 1 reads exactly the backbone's in-stage output.
    bb = model.backbone
    captured = {}
    stack.ladders["1"].register_forward_pre_hook(lambda m, a: captured.update(h=a[0]))
    with torch.no_grad():
        model.features(pixels())
        h, ctx = bb.embed(pixels())
        h = bb.run_block(0, h, ctx)
        expected = bb.run_block_in_stage(1, h, ctx)
    assert torch.equal(captured["h"], expected)


# -- 2 and 3. no gradient into the backbone, no graph in it, every side parameter trained ---------------------------
@pytest.mark.parametrize("keep", [None, (0, 2, 3)])
def test_backbone_gets_no_grad_records_no_graph_and_every_side_parameter_a_gradient(keep):
    model = wrap(r=2, keep_layers=keep).train()
    outputs = []
    hooks = [m.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for m in frozen_modules(model)]
    with count_saved_inside(frozen_modules(model), model) as inside:
        loss = model(**pixels()).loss
    for h in hooks:
        h.remove()
    loss.backward()
    assert inside.count == 0 and inside.bytes == 0
    assert len(outputs) == 5 and all(o.grad_fn is None for o in outputs)      # 4 blocks and the merging
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    for n, p in model.trainable_named_parameters():
        assert p.grad is not None, n
        if n.endswith("gates"):
            used = range(4) if keep is None else keep
            assert all(p.grad[i] != 0 for i in used) and (keep is None or p.grad[1] == 0)
        else:
            assert p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("keep,blocks_run", [((0,), 1), ((2, 3), 4), ((1, 2), 3)])
def test_dropped_layers_and_whole_stages(keep, blocks_run):
    """A stage without kept blocks still has its side transition; backbone blocks after the last kept one do not
    run; one ladder and one side block per kept layer."""
    model = wrap(r=2, keep_layers=keep)
    stack = model.output_stack
    assert sorted(int(i) for i in stack.blocks) == list(keep)
    assert sorted(k for k in stack.ladders if k != "embed") == [str(i) for i in keep]
    assert sorted(stack.transitions) == ["1"] and model.up.in_features == 16
    calls = []
    for b in model.backbone.blocks:
        b.register_forward_hook(lambda *a: calls.append(1))
    out = model(**pixels())
    assert len(calls) == blocks_run and out.logits.shape == (2, 3)
    out.loss.backward()
    assert stack.transition(1).reduction.weight.grad.abs().sum() > 0


# -- 4. pruned-weight initialisation ---------------------------------------------------------------------------------
def test_r1_magnitude_pruning_copies_the_backbone_exactly():
    model = wrap(r=1)
    bb, stack = model.backbone, model.output_stack
    for i, block in enumerate(bb.blocks):
        side = dict(stack.block(i).named_parameters())
        own = dict(block.named_parameters())
        assert side.keys() == own.keys()
        for n in own:
            assert torch.equal(side[n], own[n]), (i, n)
    for i, merge in bb.stage_merges().items():
        for n, p in merge.named_parameters():
            assert torch.equal(stack.transition(i).get_parameter(n), p), n
    for n, p in bb.final_norm.named_parameters():
        assert torch.equal(stack.norm.get_parameter(n), p), n
    # The same weights compute the same function: each side block on the backbone block's own input (shifted
    # windows in blocks 1 and 3), with the backbone's kernel (eager, the side's default on Swin).
    eager = model.eval()
    with torch.no_grad():
        h, ctx = eager.backbone.embed(pixels())
        for i in range(4):
            side = eager.backbone.run_side_block(eager.output_stack.block(i), h,
                                                 eager.backbone.side_context(h, ctx, None))
            h = eager.backbone.run_block_in_stage(i, h, ctx)
            assert torch.equal(side, h), i
            h = eager.backbone.stage_transition(i, h, ctx)


@pytest.mark.parametrize("keep", [None, (0, 2, 3), (2, 3)])
def test_pruning_copies_recorded_slices_through_the_stage_transition(keep):
    model = wrap(r=2, keep_layers=keep)
    records = assert_pruning_records_hold(model)
    side_params = [n for n, _ in model.named_parameters()
                   if n.startswith("stacks.") and any(x in n for x in (".blocks.", ".norm.", ".transitions."))]
    assert side_params and set(side_params) <= set(records)
    merge = "stacks.encoder.transitions.1"
    src, rows, cols = records[f"{merge}.reduction.weight"]
    assert src == "backbone.model.encoder.layers.0.downsample.reduction.weight"
    # The merging's columns tile the chain's P (block 1's fc2 rows: 8 of 16) over the 4 neighbour copies ...
    P = records["stacks.encoder.blocks.1.mlp.fc2.weight"][1] if keep is None or 1 in keep else None
    if P is not None:
        assert torch.equal(cols, torch.cat([k * 16 + P for k in range(4)]))
        assert torch.equal(records[f"{merge}.norm.weight"][1], cols)
    assert cols.numel() == 32 and rows.numel() == 16
    # ... and its rows are the P of stage 1: block 2's layernorm and q/k/v columns.
    if keep is None or 2 in keep:
        assert torch.equal(records["stacks.encoder.blocks.2.layernorm_before.weight"][1], rows)
        assert torch.equal(records["stacks.encoder.blocks.2.attention.q_proj.weight"][2], rows)
        for x in ("k_proj", "v_proj"):                                  # q, k, v share rows
            assert torch.equal(records[f"stacks.encoder.blocks.2.attention.{x}.weight"][1],
                               records["stacks.encoder.blocks.2.attention.q_proj.weight"][1])
    for i in (keep or range(4)):                                         # every side block's table, whole
        table = f"stacks.encoder.blocks.{i}.attention.relative_position_bias.relative_position_bias_table"
        assert records[table][1:] == (None, None)


def test_a_dominant_merge_row_is_selected():
    lm = load_model("tiny-swin")
    with torch.no_grad():
        lm.model.encoder.layers[0].downsample.reduction.weight[21] *= 100
    torch.manual_seed(0)
    model = memtune.wrap(lm, config_for("lst", {"r": 2}), num_labels=3)
    rows = model.pruning_records["stacks.encoder.transitions.1.reduction.weight"][1]
    assert 21 in rows


def test_fisher_init_runs_and_leaves_the_backbone():
    model = wrap(r=2, init="fisher")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    used = model.initialize_from_fisher([pixels(B=2, seed=s) for s in range(2)], samples=3)
    assert used == 3 and not model.data_init_pending
    assert all(torch.equal(before[k], v) for k, v in model.backbone.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


# -- 5. shifted windows ---------------------------------------------------------------------------------------------
def test_side_blocks_shift_as_the_blocks_they_mirror():
    model = wrap(r=2).eval()
    with torch.no_grad():
        model.features(pixels())                  # a forward: HF may reset shifts on small grids (not here)
    bb, stack = model.backbone, model.output_stack
    assert [stack.block(i).shift_size for i in range(4)] == [b.shift_size for b in bb.blocks] == [0, 2, 0, 2]
    assert [stack.block(i).window_size for i in range(4)] == [b.window_size for b in bb.blocks] == [4] * 4
    # The shift (and its mask) is used: block 1 with shift 2 computes something else than with shift 0.
    blk = stack.block(1)
    s = torch.randn(2, 256, 8)
    sctx = bb.side_context(s, {"stage_grids": ((16, 16), (8, 8))}, model.side_configs["encoder"])
    with torch.no_grad():
        shifted = bb.run_side_block(blk, s, sctx)
        blk.shift_size = 0
        plain = bb.run_side_block(blk, s, sctx)
        blk.shift_size = 2
    assert (shifted - plain).abs().max() > 1e-4


def test_auto_side_attention_is_eager_and_sdpa_computes_the_same():
    """Swin's side attention adds the trainable bias and the shift mask as an attention mask: "auto" runs eager
    (a mask that needs a gradient keeps CPU SDPA on the math path anyway); "sdpa" gives the same logits."""
    eager, fused = wrap(r=2).eval(), wrap(r=2, attention="sdpa").eval()
    assert eager.side_attention == "eager" and fused.side_configs["encoder"]._attn_implementation == "sdpa"
    batch = pixels()
    with torch.no_grad():
        torch.testing.assert_close(fused(**batch).logits, eager(**batch).logits, rtol=1e-5, atol=1e-6)


# -- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options,fragment", [
    ({"cache_trunk": True, "trunk_dropout": False}, "cache_trunk is not supported on swin"),
    ({"side_heads": 2}, "side_heads=2"),
])
def test_bad_options_are_refused(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        wrap(**options)


def test_meft_stays_refused_on_swin():
    with pytest.raises(ConfigError, match="its width doubles at each patch merging between stages"):
        memtune.wrap(load_model("tiny-swin"), "meft1", num_labels=2)
    assert "swin" in memtune.METHODS["lst"].supported_families()


# -- 6. CLI: train, eval, save/load --------------------------------------------------------------------------------
def test_cli_trains_evaluates_and_the_adapter_round_trips(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-swin", "--task", str(image_folder), "--method", "lst", "--max-steps", "2",
                 "--batch-size", "4", "--test-limit", "4", "--no-progress", "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-swin", "--adapter", str(run), "--no-progress"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["accuracy"] == metrics["accuracy"]
    model = wrap(num_labels=2, r=2).eval()
    model.save_pretrained(tmp_path / "saved")
    loaded = memtune.load("tiny-swin", tmp_path / "saved").eval()
    batch = pixels()
    batch.pop("labels")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_a_side_width_that_breaks_the_doubling_gets_a_merging_to_the_next_stages_width():
    """Widths 24 / 48 with heads 4 / 3 at r = 4: d'_0 = 4·round(24/16) = 8, d'_1 = 3·round(48/12) = 12 ≠ 16, so the
    side merging maps 4·8 → 12; the pruning chain still crosses it (its rows are the next stage's P)."""
    from transformers import SwinConfig, SwinModel

    torch.manual_seed(0)
    hf = SwinModel(SwinConfig(image_size=32, patch_size=2, embed_dim=24, depths=[2, 2], num_heads=[4, 3],
                              window_size=4))
    model = memtune.wrap(hf, config_for("lst", {"r": 4}), num_labels=3)
    merge = model.output_stack.transition(1)
    assert model.side_configs["encoder"].side_stage_widths == (8, 12)
    assert (merge.reduction.in_features, merge.reduction.out_features) == (32, 12)
    rows = model.pruning_records["stacks.encoder.transitions.1.reduction.weight"][1]
    assert torch.equal(model.pruning_records["stacks.encoder.blocks.2.layernorm_before.weight"][1], rows)
    out = model(**pixels())
    out.loss.backward()
    assert out.logits.shape == (2, 3) and merge.reduction.weight.grad.abs().sum() > 0

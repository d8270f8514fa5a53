"""SHERL on a hierarchical backbone (tiny Swin: blocks 0..1 at width 16 on a 16×16 grid, blocks 2..3 at width 32 on
8×8): per-stage pooling and projection to the guide's grid and width (methods/sherl/stages.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memtune
from memtune.memory.plan import PlanSettings
from memtune.memory.saved import count_saved_inside
from memtune.methods.base import ConfigError
from memtune.methods.sherl.stages import StageProjection, pool_to_grid
from memtune.models import load_model

from ..memory.test_plan import assert_agrees
from .side_helpers import fit_fixed_batch


def make(num_labels=3, **options):
    return memtune.wrap(load_model("tiny-swin"), memtune.config_for("sherl", options), num_labels=num_labels)


def pixels(B=2, seed=1):
    torch.manual_seed(seed)
    return {"pixel_values": torch.randn(B, 3, 32, 32)}


def capture_mtsa_inputs(model):
    seen = {}
    model.mtsa.register_forward_hook(lambda mod, args, out: seen.update(feats=args[0], out=out))
    return seen


# -- support and refusals --------------------------------------------------------------------------------
def test_swin_is_supported_through_its_stages():
    config = memtune.METHODS["sherl"]
    assert "swin" in config.supported_families() and "bert" in config.supported_families()
    model = make()
    assert model.hierarchical
    assert not memtune.wrap(load_model("tiny-vit"), "sherl", num_labels=3).hierarchical


@pytest.mark.parametrize("options,fragment", [
    ({"late_layers": 3}, r"late_layers=3 would make the late route \(blocks 1\.\.3\) span a stage transition.*"
                         r"allowed: 1\.\.2"),
    ({"late_layers": 4}, r"late_layers=4 leaves no early layer.*allowed: 1\.\.3"),
    ({"cache_trunk": True, "trunk_dropout": False}, r"cache_trunk is not supported on swin"),
])
def test_bad_options_are_refused(options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        make(**options)


# -- the recipe, the projections and the shapes -------------------------------------------------------------
def test_clip_vil_recipe_at_the_guides_width():
    model = make()                                              # late block 3; guide = block 2 (stage 1, width 32)
    assert (model.num_early, model.taps, model.guide_stage) == (3, [0, 1, 2], 1)
    assert model.side_width == 16                               # clip-vil: d = D_g / 2
    assert model.mtsa.num_features == 4                         # embedding, blocks 0, 1, 2
    # Width-16 features (the embedding, blocks 0 and 1) get a projection to 32; the guide's stage does not.
    assert sorted(model.stage_proj) == ["block0", "block1", "embed"]
    for proj in model.stage_proj.values():
        assert isinstance(proj, StageProjection)
        assert (proj.linear.in_features, proj.linear.out_features) == (16, 32)
        assert isinstance(proj.norm, nn.LayerNorm) and proj.norm.normalized_shape == (32,)
        assert (proj.linear.bias == 0).all()                    # the recipe's init: N(0, 0.02²), zero biases
    two = make(late_layers=2)                                   # guide = block 1 (stage 0, width 16)
    assert (two.side_width, two.guide_stage, len(two.stage_proj)) == (8, 0, 0)


def test_every_feature_reaches_the_mtsa_at_the_guides_grid_and_width():
    model = make().eval()
    seen = capture_mtsa_inputs(model)
    proj_inputs = {}
    for name, proj in model.stage_proj.items():
        proj.linear.register_forward_pre_hook(lambda mod, args, name=name: proj_inputs.__setitem__(name, args[0]))
    with torch.no_grad():
        model.features(pixels())
    assert [tuple(f.shape) for f in seen["feats"]] == [(2, 64, 32)] * 4   # the 8×8 guide grid, D_g = 32
    # The trainable maps read the pooled 8×8 maps (never the 16×16 ones), which carry no graph.
    assert {n: tuple(x.shape) for n, x in proj_inputs.items()} == {n: (2, 64, 16) for n in ("embed", "block0",
                                                                                               "block1")}
    assert not any(x.requires_grad for x in proj_inputs.values())
    # The guide is block 2's own output, unpooled and unprojected.
    bb = model.backbone
    with torch.no_grad():
        h, ctx = bb.embed(pixels())
        for i in range(3):
            h = bb.run_block(i, h, ctx)
    assert torch.equal(seen["feats"][-1], h)


def test_pooling_is_max_plus_avg_to_the_target_grid():
    torch.manual_seed(0)
    h = torch.randn(2, 16 * 16, 5)                              # B×(rows·cols)×C, row-major
    grid = h.transpose(1, 2).reshape(2, 5, 16, 16)
    expected = (F.max_pool2d(grid, 2) + F.avg_pool2d(grid, 2)).flatten(2).transpose(1, 2)
    assert torch.allclose(pool_to_grid(h, (16, 16), (8, 8)), expected, atol=1e-6)
    # Non-square: 4×8 → 2×2 takes 2×4 windows; token (r, c) sits at r·cols + c.
    h2 = torch.arange(32.0).reshape(1, 32, 1)
    out = pool_to_grid(h2, (4, 8), (2, 2)).flatten()
    windows = h2.reshape(4, 8).unfold(0, 2, 2).unfold(1, 4, 4).reshape(2, 2, 8)
    assert torch.equal(out, (windows.amax(-1) + windows.mean(-1)).flatten())
    assert pool_to_grid(h, (16, 16), (16, 16)) is h             # same grid: untouched
    with pytest.raises(ValueError, match="do not form the 8×8 grid"):
        pool_to_grid(h, (8, 8), (4, 4))


# -- gate, identity and gradients --------------------------------------------------------------------------
def open_route(model):
    """U's output forced to 0 and γ = 10 (tanh(100) = 1): X̃ = the guide exactly."""
    with torch.no_grad():
        model.mtsa.up.weight.zero_()
        model.mtsa.up.bias.zero_()
        model.mtsa.gamma.fill_(10.0)


def backbone_features(model, batch):
    with torch.no_grad():
        h, ctx = model.backbone(batch)
        return model.backbone.pool(h, ctx)


def test_gate_closed_at_init():
    model = make().eval()
    seen = capture_mtsa_inputs(model)
    with torch.no_grad():
        feats = model.features(pixels())
    t = model.mtsa.terms(seen["feats"])
    assert t["gate"].item() == 0.0 and torch.equal(seen["out"], t["G"])   # X̃ = U(ReLU(g)) exactly
    assert (feats - backbone_features(model, pixels())).abs().max() > 1e-2


@pytest.mark.parametrize("late_layers", [1, 2])
def test_open_route_with_zero_restore_is_the_backbone(late_layers):
    """late_layers=2: the guide (block 1) ends stage 0, so the frozen patch merging runs on X̃ first."""
    model = make(late_layers=late_layers).eval()
    g = torch.Generator().manual_seed(3)
    norm = model.backbone.final_norm                            # a non-trivial final norm, so a skipped one shows
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))
    open_route(model)
    batch = pixels()
    ref = backbone_features(model, batch)
    with torch.no_grad():
        feats = model.features(batch)
        logits = model(**batch).logits
    assert (feats - ref).abs().max() <= 1e-6
    assert (logits - model.head(ref)).abs().max() <= 1e-6


def test_no_graph_in_the_early_blocks_and_the_trainable_set():
    model = make()
    assert len(model.early_blocks) == 3 and len(model.late_blocks) == 1
    batch = {**pixels(), "labels": torch.tensor([0, 2])}
    with count_saved_inside(model.early_blocks, model) as early:
        loss = model(**batch).loss
    loss.backward()
    assert early.count == 0 and early.bytes == 0
    for n, p in model.backbone.named_parameters():             # the late block and the final norm included
        assert not p.requires_grad and p.grad is None, n
    trainable = {n.split(".")[0] for n, _ in model.trainable_named_parameters()}
    assert trainable == {"stage_proj", "mtsa", "head"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.trainable_named_parameters()}


def test_a_gradient_reaches_every_projection_once_the_gate_opens():
    model = make()
    with torch.no_grad():
        model.mtsa.gamma.fill_(0.05)
    batch = {**pixels(), "labels": torch.tensor([0, 2])}
    model(**batch).loss.backward()
    for n, p in model.trainable_named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert model.mtsa.gamma.grad.abs() > 0


def test_compact_tap_storage_keeps_the_gradients_close():
    """tap_storage=bf16 on the stage projections' frozen pooled inputs: gradients within bf16 rounding."""
    grads = {}
    for storage in ("full", "bf16"):
        torch.manual_seed(0)
        model = make(tap_storage=storage)
        model(**pixels(), labels=torch.tensor([0, 2])).loss.backward()
        grads[storage] = model.stage_proj["embed"].linear.weight.grad
    assert torch.allclose(grads["bf16"], grads["full"], rtol=0.05, atol=1e-3 * grads["full"].abs().max())
    assert not torch.equal(grads["bf16"], grads["full"])


def test_trains_on_a_fixed_batch():
    model = make()
    batch = {**pixels(), "labels": torch.tensor([0, 2])}
    first, last = fit_fixed_batch(model, batch, lr=3e-3, steps=20)
    assert last < 0.5 * first


# -- memory plan -------------------------------------------------------------------------------------------
def test_plan_agrees_with_the_measurement():
    settings = PlanSettings(model="tiny-swin", batch_size=2, max_length=16, device="cpu")
    assert assert_agrees(settings, "sherl,sherl:late_layers=2") == 2

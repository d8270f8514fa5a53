"""MEFT's inverse and reversible gradients (docs/methods/meft.md §11.2, §11.3) on tiny models, held to bounds derived from
the arithmetic (`meft_bounds`): the unit roundoff where F and G compute, the coupling's amplification per
layer over the segment's depth, and a safety constant. The float64 checks run with transformers' float32
islands removed (`meft_precision`), so the forward, the inverse and ordinary autograd all compute in float64.
`test_meft_kernels.py` reruns the most sensitive of these under other ATen CPU kernels."""
import pytest
import torch

from memtune.methods.meft import reconstruction_error
from memtune.methods.meft.calibrate import exact_states
from memtune.models import load_model

from .meft_bounds import span_bounds
from .meft_helpers import FAMILIES, agreement, batch_for, hf_model, loss_of_top, wrap
from .meft_precision import stream_precision_throughout, unit_roundoff, working_precision


def agreement_within_bound(model, batch, float64=False):
    """Check the reversible gradients against ordinary autograd: equal losses, and a gradient error within
    the bound derived for this model's arithmetic (meft_bounds). float64: the model must then compute in
    float64 throughout (the `float64_throughout` fixture removes transformers' float32 islands)."""
    bounds = span_bounds(model, batch, loss_of_top=loss_of_top(batch))
    if float64:
        assert bounds.precision == torch.float64, bounds
    loss_rev, loss_ref, err = agreement(model, batch)
    assert torch.equal(loss_rev, loss_ref)
    assert err <= bounds.gradients, (err, str(bounds))
    return err, bounds


@pytest.fixture
def float64_throughout():
    """F and G compute in the streams' float64 everywhere (no float32 norm or softmax inside them)."""
    with stream_precision_throughout():
        yield


# -- where the models round ----------------------------------------------------------------------------
def test_float32_islands_are_found_and_removed():
    def precision(name):
        model = wrap(load_model(name, dtype=torch.float64), variant=3)
        h, ctx = model.embed(batch_for(model, dtype=torch.float64))
        stream = model.two_stream(ctx, h.dtype)
        layers = model.reversible_indices
        return working_precision(stream, layers, *exact_states(stream, layers, h, h))

    # Llama-like RMSNorms and eager softmax (Llama, Phi-3, Qwen3, Gemma), ModernBERT's rotary step, and the eager
    # softmax of ViT, OPT and the CLIP / SigLIP towers round to float32 in a float64 model.
    islands = {n: torch.float32 for n in ("tiny-vit", "tiny-llama", "tiny-opt", "tiny-modernbert", "tiny-phi3",
                                          "tiny-clip-vision", "tiny-siglip-vision", "tiny-qwen3", "tiny-gemma2",
                                          "tiny-gemma3")}
    assert [precision(n) for n in FAMILIES] == [islands.get(n, torch.float64) for n in FAMILIES]
    with stream_precision_throughout():
        assert [precision(n) for n in FAMILIES] == [torch.float64] * len(FAMILIES)
    assert precision("tiny-llama") == torch.float32              # and back once the context ends
    assert unit_roundoff(torch.float64) == 2.0 ** -53 and unit_roundoff(torch.float32) == 2.0 ** -24


def test_bounds_grow_by_the_coupling_amplification_per_layer(float64_throughout):
    # docs/methods/meft.md §9: an error grows by ≈ ‖J‖/λ per layer (MEFT1), ‖J‖/β (MEFT2), ‖J‖²/(λβ) (MEFT3). Post-LN BERT's
    # sub-layers have ‖J‖ ≈ 1, so each layer down multiplies the bound by about 10, 10 and 100.
    for variant, amplification in ((1, 10.0), (2, 10.0), (3, 100.0)):
        model = wrap(load_model("tiny-bert", dtype=torch.float64), variant=variant).train()
        bounds = span_bounds(model, batch_for(model, dtype=torch.float64), segment_layers=4)
        gain = bounds.layer_gain                                          # bottom first
        assert all(0.5 < gain[j] / gain[j + 1] / amplification < 2 for j in range(3)), (variant, gain)
        # Single-layer segments restart from exact states: no growth from layer to layer.
        single = span_bounds(model, batch_for(model, dtype=torch.float64), segment_layers=1).layer_gain
        assert max(single) < 2 * min(single) and max(single) < gain[0] / amplification ** 2


# -- §11.2 inversion -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_inverse_recovers_the_inputs(name, variant, float64_throughout):
    # float64, one segment of 4 layers: every layer's recomputed inputs within its bound.
    model = wrap(load_model(name, dtype=torch.float64), variant=variant).train()
    batch = batch_for(model, dtype=torch.float64)
    report = reconstruction_error(model, batch, segment_layers=4)
    assert len(report.errors) == 4 and report.segments == [[0, 1, 2, 3]]
    bounds = span_bounds(model, batch, segment_layers=4)
    assert bounds.precision == torch.float64, bounds
    assert all(e <= b for e, b in zip(report.errors, bounds.layer_bounds)), (str(report), str(bounds))
    # float32, segments of one layer (a float32 model has no less precise island to remove).
    model = wrap(name, variant=variant).train()
    batch = batch_for(model)
    report = reconstruction_error(model, batch, segment_layers=1)
    bounds = span_bounds(model, batch, segment_layers=1)
    assert bounds.precision == torch.float32
    assert report.max_error > 0
    assert all(e <= b for e, b in zip(report.errors, bounds.layer_bounds)), (str(report), str(bounds))


# -- §11.3 gradients against ordinary autograd -----------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_gradients_match_autograd_float64_four_layers(name, variant, float64_throughout):
    model = wrap(load_model(name, dtype=torch.float64), variant=variant, segment_layers=4).train()
    agreement_within_bound(model, batch_for(model, dtype=torch.float64), float64=True)


@pytest.mark.parametrize("variant", [1, 2])
def test_gradients_match_autograd_float64_six_layers(variant, float64_throughout):
    model = wrap(hf_model("bert", 6, torch.float64), variant=variant, segment_layers=6).train()
    agreement_within_bound(model, batch_for(model, dtype=torch.float64), float64=True)


@pytest.mark.parametrize("variant", [1, 2, 3])
def test_gradients_match_autograd_float32(variant):
    # λ = β = 1 over 6 layers, and the paper's MEFT1/2 factors over 2 layers (docs/methods/meft.md §11.3).
    model = wrap(hf_model("bert", 6), variant=variant, lam=1.0, beta=1.0, segment_layers=6).train()
    agreement_within_bound(model, batch_for(model))
    if variant != 3:
        model = wrap(hf_model("bert", 2), variant=variant, segment_layers=2).train()
        agreement_within_bound(model, batch_for(model))


def test_gradients_match_autograd_causal_lm_mpnet_and_partial_reversibility(float64_throughout):
    # Causal LM through the frozen LM head (read-out: PLM stream + s·other, s trains), float32.
    model = wrap("tiny-llama", num_labels=None, segment_layers=2).train()
    assert model.readout_mode == "plm" and model.mix.requires_grad
    agreement_within_bound(model, batch_for(model))
    # MPNet's relative position bias reaches F and G through ctx.
    model = wrap(hf_model("mpnet", 2, torch.float64), variant=3, segment_layers=2).train()
    agreement_within_bound(model, batch_for(model, dtype=torch.float64), float64=True)
    # "Setting 1" and "setting 3": a frozen plain layer, two reversible, one ordinary two-stream layer.
    model = wrap(load_model("tiny-bert", dtype=torch.float64), frozen_layers=1, reversible_layers=2,
                 segment_layers=1).train()
    assert (model.reversible_indices, model.upper_indices, len(model.adapters)) == ([1, 2], [3], 3)
    agreement_within_bound(model, batch_for(model, dtype=torch.float64), float64=True)

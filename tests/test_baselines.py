"""Every baseline on every family's tiny model: trainable set, frozen weights, save/load, wrong base."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import memtune
from memtune.checkpoint import CheckpointError
from memtune.methods import ConfigError
from memtune.models import load_model

from .conftest import TINY, tiny_batch

BASELINES = ("full", "linear", "bitfit", "lora", "ia3", "adapter")


def wrap(name, method, **options):
    torch.manual_seed(0)
    lm = load_model(name)
    return memtune.wrap(lm, memtune.config_for(method, options), num_labels=3)


def linears(model, suffixes):
    """Linear layers (plain or wrapped by peft, which keeps the original as `.base_layer`) by name suffix."""
    return [m for n, m in model.backbone.model.named_modules()
            if (isinstance(m, (nn.Linear, Conv1D)) or hasattr(m, "base_layer"))
            and any(n.endswith("." + s) for s in suffixes)]


def in_out(layer) -> tuple[int, int]:
    """(in, out) widths of nn.Linear, or of transformers' Conv1D (GPT-2: nx → nf)."""
    return (layer.nx, layer.nf) if isinstance(layer, Conv1D) else (layer.in_features, layer.out_features)


def expected_trainable(model, method) -> int:
    """The trainable count from each method's formula, computed from the backbone's shapes."""
    bb = model.backbone
    head = model.head.weight.numel() + model.head.bias.numel()
    if method == "full":
        return sum(p.numel() for p in model.parameters())
    if method == "linear":
        return head
    if method == "bitfit":
        return head + sum(p.numel() for n, p in bb.named_parameters() if n.endswith("bias"))
    if method == "lora":
        r = model.method_config.r
        return head + sum(r * sum(in_out(m.base_layer)) for m in linears(model, bb.lora_targets))
    if method == "ia3":
        ff = set(map(id, linears(model, bb.ia3_feedforward)))
        return head + sum(in_out(m.base_layer)[0 if id(m) in ff else 1] for m in linears(model, bb.ia3_targets))
    if method == "adapter":
        d_hidden = bb.hidden_size // model.method_config.reduction
        return head + sum(2 * in_out(m)[1] * d_hidden + d_hidden + in_out(m)[1]
                          for m in linears(model, bb.adapter_sites))
    raise KeyError(method)


def has_bias(name) -> bool:
    return any(n.endswith("bias") for n, _ in load_model(name).model.named_parameters())


def applicable(name, method):
    # Families without bias terms (T5, Llama, Phi-3, ...): BitFit refuses them (tested below).
    return not (method == "bitfit" and not has_bias(name))


CASES = [(n, m) for n in TINY for m in BASELINES if applicable(n, m)]


@pytest.mark.parametrize("name,method", CASES)
def test_trainable_set_matches_formula_and_frozen_weights_get_no_grad(name, method):
    model = wrap(name, method)
    trainable, _ = model.num_parameters_split()
    assert trainable == expected_trainable(model, method)
    batch = tiny_batch(model)
    model(**batch).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{n} is trainable but got no gradient"
        else:
            assert p.grad is None, f"frozen {n} received a gradient"


@pytest.mark.parametrize("name,method", CASES)
def test_save_load_round_trip_gives_identical_outputs(name, method, tmp_path):
    model = wrap(name, method)
    with torch.no_grad():  # move every trainable tensor off its init so the round trip is meaningful
        for _, p in model.trainable_named_parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    batch = tiny_batch(model, labels=False)
    expected = model(**batch).logits
    model.save_pretrained(tmp_path)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    restored = memtune.load(name, tmp_path).eval()
    torch.testing.assert_close(restored(**batch).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "adapter", "linear"])
def test_loading_into_another_base_model_fails_clearly(method, tmp_path):
    wrap("tiny-bert", method).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="made for base model 'tiny-bert'"):
        memtune.load("tiny-t5", tmp_path)


def test_loading_another_method_into_a_model_fails_clearly(tmp_path):
    from memtune.checkpoint import check_compatible, read_adapter_config

    wrap("tiny-bert", "lora").save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="holds method 'lora'"):
        check_compatible(read_adapter_config(tmp_path), wrap("tiny-bert", "adapter"))


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_bitfit_refuses_models_without_biases(name):
    with pytest.raises(ConfigError, match="no bias terms"):
        wrap(name, "bitfit")


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-vit"])
def test_adapters_and_lora_start_at_the_pretrained_function(name):
    full = wrap(name, "full").eval()
    batch = tiny_batch(full, labels=False)
    for method in ("adapter", "lora"):
        other = wrap(name, method).eval()
        other.head.load_state_dict(full.head.state_dict())
        torch.testing.assert_close(other(**batch).logits, full(**batch).logits)


def test_linear_probe_builds_no_graph_through_the_backbone():
    model = wrap("tiny-bert", "linear")
    feats = model.features(tiny_batch(model))
    assert feats.grad_fn is None


def test_causal_lm_objective_on_a_decoder():
    torch.manual_seed(0)
    model = memtune.wrap(load_model("tiny-llama"), "lora")
    assert model.objective == "causal-lm" and model.head is None
    out = model(**tiny_batch(model))
    assert out.logits.shape[-1] == model.backbone.config.vocab_size
    assert torch.isfinite(out.loss)


def test_encoders_need_num_labels():
    with pytest.raises(ConfigError, match="needs num_labels"):
        memtune.wrap(load_model("tiny-bert"), "lora")


@pytest.mark.parametrize("options,match", [({"r": -1}, "positive"), ({"r": "abc"}, "expected int"),
                                           ({"alpha": 0}, "alpha"), ({"rank": 4}, "unknown option")])
def test_bad_config_values_fail_at_construction(options, match):
    with pytest.raises(ConfigError, match=match):
        memtune.config_for("lora", options)


def test_full_classifier_leaves_an_untied_lm_head_frozen():
    """A decoder classifier never computes vocabulary logits: an untied LM head gets no gradient, so full
    fine-tuning does not train it (it would only hold AdamW state); every trainable tensor gets a gradient."""
    from transformers import LlamaForCausalLM

    config = load_model("tiny-llama").model.config
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    model = memtune.wrap(LlamaForCausalLM(config), "full", num_labels=2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "backbone.model.lm_head.weight" not in trainable and "backbone.model.model.embed_tokens.weight" in trainable
    model(**tiny_batch(model)).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    lm = memtune.wrap(LlamaForCausalLM(config), "full")                  # causal LM: the head is the output
    assert lm.get_parameter("backbone.model.lm_head.weight").requires_grad

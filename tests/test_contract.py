"""The contract every method keeps on every tiny family it supports (docs/contributing.md §4.2).

Parametrised from the registry (`memtune.METHODS`) and the tiny families (`memtune.models.TINY`), decoders with
both objectives, so a new method or family is checked with nothing to add here. fp32, seeded, CPU:

- a refused pair raises ConfigError / UnsupportedModel in one line that names what does work;
- after one forward + backward exactly the trainable tensors have a gradient, and every one of them has a
  non-zero gradient by the second step (zero-initialised halves — LoRA's B, adapters' up, QST's α = 1 mix —
  hold their partners at zero on the first; `structurally_zero` names the gradients the arithmetic keeps at
  zero for good);
- the blocks a method promises to run without an autograd graph pack nothing for backward and return no
  tensor with a grad_fn, and every other block that runs is on the graph (so the promise is complete);
- save_pretrained → memtune.load on a fresh base gives bit-identical outputs, from a file of the trainable
  tensors only;
- a few AdamW steps at the method's default learning rate lower the loss on a fixed batch;
- the meta-device plan (device="cpu") is within 5 % of the CPU tracker's peak and activation peak (marked
  slow: planning takes a few seconds a pair on the meta device).
"""
import json
import re

import pytest
import torch
from safetensors import safe_open

import memtune
from memtune.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from memtune.memory.plan import PlanSettings, plan

from .contract_helpers import (CLASSES, REFUSALS, BlockCensus, adamw, all_blocks, all_pairs, contract_batch,
                               family_of, graph_free_blocks, pair_id, refusal, refused_pairs, structurally_zero,
                               supported_pairs, train_steps, wrap_pair)
from .memory.test_plan import assert_agrees

SUPPORTED = supported_pairs()
REFUSED = refused_pairs()
supported = pytest.mark.parametrize("method,tiny,objective", SUPPORTED, ids=[pair_id(p) for p in SUPPORTED])


def outputs(model, batch):
    """Eval-mode logits (B×C, or B×T×V for a causal LM)."""
    model.eval()
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def named(word: str, message: str) -> bool:
    """`word` appears in `message` as a name of its own ('dtl' is not named by 'dtl+', nor 'lora' by 'loras')."""
    return re.search(rf"(?<![\w+-]){re.escape(word)}(?![\w+-])", message) is not None


# -- the matrix itself -------------------------------------------------------------------------------------------
def test_every_method_supports_some_family_and_every_family_some_method():
    assert {m for m, _, _ in SUPPORTED} == set(memtune.METHODS)
    assert {(t, o) for _, t, o in SUPPORTED} == {(t, o) for _, t, o in all_pairs()}


@pytest.mark.parametrize("method,tiny,objective", REFUSED, ids=[pair_id(p) for p in REFUSED])
def test_a_refused_pair_says_what_is_supported(method, tiny, objective):
    with pytest.raises(REFUSALS) as e:
        wrap_pair(method, tiny, objective)
    message = str(e.value)
    assert message == refusal(method, tiny, objective) and "\n" not in message
    # What works instead: the families this method does support, another objective it supports on this
    # family, or other methods that support this pair.
    families = {family_of(t) for m, t, _ in SUPPORTED if m == method}
    objectives = {o for m, t, o in SUPPORTED if m == method and t == tiny}
    others = {m for m, t, o in SUPPORTED if (t, o) == (tiny, objective)}
    names_families = families and all(named(f, message) for f in families)
    names_objective = any(named(o, message) for o in objectives)
    names_methods = any(named(m, message) for m in others)
    assert names_families or names_objective or names_methods, \
        (message, {"families": families, "objectives": objectives, "methods": others})


# -- 1. the trainable set ----------------------------------------------------------------------------------------
@supported
def test_gradients_reach_exactly_the_trainable_set(method, tiny, objective):
    model = wrap_pair(method, tiny, objective).train()
    batch = contract_batch(model)
    torch.manual_seed(0)
    model(**batch).loss.backward()
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable, "nothing trains"
    assert {n for n, _ in model.trainable_named_parameters()} == trainable
    missing = sorted(n for n in trainable if params[n].grad is None)
    frozen_with_grad = sorted(n for n, p in params.items() if not p.requires_grad and p.grad is not None)
    assert not missing, f"trainable tensors off the loss's graph: {missing}"
    assert not frozen_with_grad, f"frozen tensors with a gradient: {frozen_with_grad}"


@supported
def test_every_trainable_tensor_gets_a_gradient_within_two_steps(method, tiny, objective):
    model = wrap_pair(method, tiny, objective)
    batch = contract_batch(model)
    optimizer = adamw(model, 1e-3)
    seen = set()
    for step in range(2):
        torch.manual_seed(step)
        optimizer.zero_grad(set_to_none=True)
        model.train()(**batch).loss.backward()
        seen |= {n for n, p in model.named_parameters() if p.grad is not None and bool(p.grad.any())}
        optimizer.step()
    never = sorted(n for n, p in model.named_parameters()
                   if p.requires_grad and n not in seen and not structurally_zero(model, batch, n))
    assert not never, f"trainable tensors whose gradient stayed exactly zero for two steps: {never}"


# -- 2. no graph in the blocks a method runs without one -----------------------------------------------------------
@supported
def test_graph_free_blocks_pack_nothing_and_the_others_are_on_the_graph(method, tiny, objective):
    model = wrap_pair(method, tiny, objective)
    batch = contract_batch(model)
    train_steps(model, batch, adamw(model, 1e-3), 1)         # first-step work (MEFT's calibration) is done
    blocks = all_blocks(model)
    promised = {id(b) for b in graph_free_blocks(model) or []}
    torch.manual_seed(1)
    with BlockCensus(blocks) as census:
        loss = model.train()(**batch).loss
    loss.backward()                                           # outside the census: recomputation is allowed
    assert all(p.grad is None for p in model.backbone.parameters() if not p.requires_grad)
    ran = [i for i, b in enumerate(blocks) if census.calls[i]]
    assert ran, "no backbone block ran"
    for i, block in enumerate(blocks):
        if id(block) in promised:
            assert census.calls[i], f"block {i} is promised graph-free but never ran"
            assert census.saved[i] == 0, f"graph-free block {i} packed {census.saved[i]} tensors for backward"
            assert not census.graph_outputs[i], f"graph-free block {i} returned graph tensors: " \
                                                f"{census.graph_outputs[i][:4]}"
        elif census.calls[i]:
            assert census.saved[i] > 0 and census.graph_outputs[i], \
                f"block {i} runs without a graph but the method does not declare it (graph_free_blocks)"


# -- 3. save → load ------------------------------------------------------------------------------------------------
@supported
def test_save_then_load_gives_bit_identical_outputs_from_the_trainable_tensors_only(method, tiny, objective,
                                                                                    tmp_path):
    model = wrap_pair(method, tiny, objective)
    batch = contract_batch(model)
    train_steps(model, batch, adamw(model, 1e-2), 2)          # moved away from any initialisation
    model.save_pretrained(tmp_path)
    trainable = dict(model.trainable_named_parameters())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    with safe_open(str(tmp_path / WEIGHTS_NAME), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert set(saved) == set(trainable) and not set(saved) & frozen
    assert all(torch.equal(saved[n], p.detach()) for n, p in trainable.items())
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["method"] == method

    expected = outputs(model, batch)
    torch.manual_seed(123)                                    # another draw for whatever the load initialises
    loaded = memtune.load(tiny, tmp_path)
    assert loaded.backbone is not model.backbone and loaded.objective == objective
    assert torch.equal(outputs(loaded, batch), expected)
    fresh = wrap_pair(method, tiny, objective)                # the check can fail: untrained outputs differ
    assert not torch.equal(outputs(fresh, batch), expected)


# -- 4. the loss falls ---------------------------------------------------------------------------------------------
STEPS = 5
RELATIVE_FALL = 1e-5


@supported
def test_the_loss_falls_on_a_fixed_batch(method, tiny, objective):
    model = wrap_pair(method, tiny, objective)
    batch = contract_batch(model)
    lr = type(model.method_config).default_lr
    before = model.eval()(**batch).loss.item()                # eval mode: no dropout noise in the comparison
    train_steps(model, batch, adamw(model, lr), STEPS)
    after = model.eval()(**batch).loss.item()
    # The eval loss is a deterministic function of the weights. Rounding alone moves a mean cross-entropy over
    # ≤ B·T = 20 terms by a few fp32 ulps (~1e-6 relative), so a fall of more than 1e-5 relative is the updates'
    # doing; updates that never reach the output (a dead path) or climb the loss (a wrong sign) fail.
    assert after < (1 - RELATIVE_FALL) * before, (before, after, lr)


# -- 5. the plan agrees with the tracker ---------------------------------------------------------------------------
@pytest.mark.slow
@supported
def test_plan_matches_the_cpu_tracker(method, tiny, objective):
    settings = PlanSettings(model=tiny, batch_size=2, max_length=8, device="cpu", objective=objective,
                            num_labels=CLASSES)
    assert assert_agrees(settings, [method]) == 1, plan(settings, [method]).methods[0].message

"""Memory techniques on real (tiny) models: gradient checkpointing changes no number, quantized base weights
train and save without base weights, offloading and the one-line refusals."""
import pytest
import torch

import memtune
from memtune.memory.measure import measure_training_memory
from memtune.methods import ConfigError
from memtune.models import load_model
from memtune.techniques import MemoryTechniques, apply_techniques

from .conftest import tiny_batch

GC_METHODS = {"tiny-bert": ["full", "bitfit", "lora:dropout=0.1", "ia3", "adapter", "dtl", "sherl",
                            "sherl:late_layers=2"],
              "tiny-llama": ["full", "lora:dropout=0.1", "ia3", "adapter", "sherl"]}


def wrapped(model_name, spec, techniques=None):
    from memtune.spec import parse_spec

    s = parse_spec(spec)
    torch.manual_seed(0)
    loaded = load_model(model_name)                       # seeded: the same weights every time
    num_labels = None if model_name == "tiny-llama" else 2
    return memtune.wrap(loaded, memtune.config_for(s.method, s.options), num_labels=num_labels,
                        techniques=techniques)


def loss_and_grads(model, batch):
    model.train()
    torch.manual_seed(123)                                # the same dropout draws for both runs
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_name,spec", [(m, s) for m, specs in GC_METHODS.items() for s in specs])
def test_gradient_checkpointing_changes_no_loss_and_no_gradient(model_name, spec):
    plain, ckpt = wrapped(model_name, spec), wrapped(model_name, spec, "gc")
    assert ckpt.block_checkpointing is not None
    if model_name == "tiny-bert":
        assert plain.backbone.config.hidden_dropout_prob > 0          # dropout is on and must replay exactly
    batch = tiny_batch(plain, batch_size=2, length=12)
    loss_a, grads_a = loss_and_grads(plain, batch)
    loss_b, grads_b = loss_and_grads(ckpt, batch)
    assert ckpt.block_checkpointing.applied > 0
    assert torch.equal(loss_a, loss_b)                                # the same kernels on the same values
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n, g in grads_a.items():
        # Identical kernels; only the order in which autograd sums the several contributions to one
        # gradient (tied or reused weights) may differ, a few fp32 roundings of the largest term.
        scale = g.abs().max().item()
        torch.testing.assert_close(grads_b[n], g, rtol=0, atol=16 * torch.finfo(torch.float32).eps * max(scale, 1e-30),
                                   msg=lambda m, n=n: f"{spec}: {n}: {m}")


@pytest.mark.parametrize("spec", ["lora", "full", "sherl", "dtl"])
def test_gradient_checkpointing_cuts_saved_activation_bytes(spec):
    results = {}
    for t in (None, "gc"):
        model = wrapped("tiny-bert", spec, t)
        batch = tiny_batch(model, batch_size=4, length=64)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        results[t] = measure_training_memory(model.train(), batch, opt, warmup=1)
    assert results["gc"].saved_activation_bytes < 0.6 * results[None].saved_activation_bytes
    if spec in ("lora", "full"):
        # Every block is on the path: the peak falls too. (SHERL and DTL keep one or a few blocks for
        # backward; at this tiny size their peak is set by the recomputed block's temporaries instead.)
        assert results["gc"].activation_peak_bytes < 0.6 * results[None].activation_peak_bytes


@pytest.mark.parametrize("spec,techniques,expected", [
    ("linear", "gc", "gc is not needed for linear"),
    ("lst", "gc", "gc is not needed for lst"),
    ("meft1", "gc", "already recompute activations"),
    ("full", "nf4", "nf4 cannot be combined with full"),
    ("bitfit", "int8", "int8 cannot be combined with bitfit"),
    ("lora", "nf4+fp4", "pick one"),
    ("lora", "gc+zip", "unknown technique 'zip'"),
])
def test_refusals_are_one_clear_line(spec, techniques, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        wrapped("tiny-bert", spec, techniques)
    assert "\n" not in str(e.value)


def test_gc_where_no_block_is_on_the_backprop_path_is_refused_by_a_dry_forward():
    model = wrapped("tiny-bert", "linear")
    with pytest.raises(ConfigError, match="no backbone block runs with an autograd graph"):
        apply_techniques(model, "gc", check=False)
    assert "run_block" not in model.backbone.__dict__                 # the wrapping was taken back


def test_offload_is_refused_on_cpu_and_its_hooks_keep_gradients():
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="meaningless"):
            wrapped("tiny-bert", "lora", "offload")
    from memtune.techniques.offload import ActivationOffload

    plain, off = wrapped("tiny-bert", "lora"), wrapped("tiny-bert", "lora")
    hooks = ActivationOffload(off, hooks=lambda: torch.autograd.graph.save_on_cpu(pin_memory=False))
    batch = tiny_batch(plain)
    (la, ga), (lb, gb) = loss_and_grads(plain, batch), loss_and_grads(off, batch)
    assert hooks.forwards == 1 and torch.equal(la, lb)
    for n in ga:
        assert torch.equal(ga[n], gb[n]), n


# -- quantized base weights ----------------------------------------------------------------------------------
def _train_steps(model, steps=3):
    batch = tiny_batch(model, batch_size=4, length=16)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return batch, losses


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("spec,techniques", [("lora", "nf4"), ("lora", "nf4+gc"), ("lst", "nf4"),
                                             ("sherl", "nf4"), ("sherl", "int8"), ("lora", "fp4")])
def test_quantized_base_trains_saves_without_base_weights_and_loads(model_name, spec, techniques, tmp_path):
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    model = wrapped(model_name, spec, techniques)
    kind = MemoryTechniques.from_names(techniques).quantize
    layer = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    quantized = [m for m in model.backbone.modules() if isinstance(m, layer)]
    assert quantized and all(not p.requires_grad for m in quantized for p in m.parameters())
    before = {n: p.detach().clone() for n, p in model.trainable_named_parameters()}
    batch, losses = _train_steps(model)
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n, p in model.trainable_named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) >= 0.5 * len(before)              # gradient reached the method's parameters
    assert all(m.weight.grad is None for m in quantized)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert set(saved) == set(before)                    # trainable tensors only: no (quantized) base weight
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in before.values())
    loaded = memtune.load(model_name, tmp_path)
    assert loaded.memory_techniques.quantize == kind
    assert any(isinstance(m, layer) for m in loaded.backbone.modules())
    model.eval(), loaded.eval()
    batch.pop("labels")
    with torch.no_grad():
        # The same base weights quantize to the same codes, and the trained tensors are copied exactly.
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_quantized_weights_shrink_the_backbone():
    fp, q = wrapped("tiny-llama", "lora"), wrapped("tiny-llama", "lora", "nf4")
    def block_bytes(m):
        return sum(p.numel() * p.element_size() for b in m.backbone.blocks for p in b.parameters())
    # 4 bits per weight (+ LoRA and the fp32 norms, which stay): well under a quarter of the fp32 blocks.
    assert block_bytes(q) < 0.25 * block_bytes(fp)


def test_memtune_trainer_maps_gradient_checkpointing_and_takes_techniques(tmp_path):
    from .test_trainer import args, dataset, make

    from memtune.hf_trainer import MemtuneTrainer
    from transformers import DataCollatorWithPadding

    loaded, model = make("tiny-bert", "lora")
    trainer = MemtuneTrainer(model=model, args=args(tmp_path / "a", gradient_checkpointing=True, max_steps=2),
                             train_dataset=dataset(loaded.preprocessor),
                             data_collator=DataCollatorWithPadding(loaded.preprocessor), techniques="nf4")
    assert model.memory_techniques.names() == ("nf4", "gc")
    trainer.train()
    assert model.block_checkpointing.applied > 0
    saved = memtune.load("tiny-bert", tmp_path / "a" / "checkpoint-2")
    assert saved.memory_techniques.quantize == "nf4"

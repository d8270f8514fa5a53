"""The chunked LM loss (`+chunked_ce`): the plain loss and its gradients without the vocabulary-wide logits."""
import pytest
import torch
import torch.nn.functional as F

import memtune
from memtune.memory.measure import measure_training_memory
from memtune.memory.plan import PlanSettings, plan
from memtune.methods import ConfigError
from memtune.models import load_model
from memtune.spec import parse_spec
from memtune.techniques import MemoryTechniques
from memtune.techniques.chunked_loss import chunked_lm_loss, default_chunk_rows

from .conftest import tiny_batch
from .memory.test_plan_techniques import measure_real

EPS = torch.finfo(torch.float32).eps


def _problem(rows=21, d=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3, rows // 3, d, generator=g, requires_grad=True)
    w = torch.randn(vocab, d, generator=g, requires_grad=True)
    y = torch.randint(0, vocab, (3, rows // 3), generator=g)
    y[0, :3] = -100                                                     # e.g. a prompt: no loss there
    return h, w, y


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 21, 64])
def test_equals_the_plain_loss_and_its_gradients(chunk_rows):
    h, w, y = _problem()
    head = lambda x: x @ w.t()                                          # noqa: E731
    plain = F.cross_entropy(head(h).flatten(0, 1), y.flatten(), ignore_index=-100)
    gh, gw = torch.autograd.grad(plain * 3.0, [h, w])                   # a scaled loss (accumulation, AMP)
    chunked = chunked_lm_loss(h, y, head, [w], chunk_rows=chunk_rows)
    ch, cw = torch.autograd.grad(chunked * 3.0, [h, w])
    # The same fp32 terms summed in another order: a few roundings of the loss (≈ 4) and of each gradient.
    assert abs(chunked.item() - plain.item()) <= 16 * EPS * plain.item()
    torch.testing.assert_close(ch, gh, rtol=0, atol=16 * EPS * gh.abs().max().item())
    torch.testing.assert_close(cw, gw, rtol=0, atol=64 * EPS * gw.abs().max().item())


def test_frozen_head_gets_no_gradient_and_no_targets_give_nan_as_plain():
    h, w, y = _problem()
    w.requires_grad_(False)
    loss = chunked_lm_loss(h, y, lambda x: x @ w.t(), [w], chunk_rows=5)
    loss.backward()
    assert w.grad is None and h.grad is not None
    none = torch.full_like(y, -100)
    plain = F.cross_entropy((h @ w.t()).flatten(0, 1), none.flatten(), ignore_index=-100)
    assert torch.isnan(plain) and torch.isnan(chunked_lm_loss(h, none, lambda x: x @ w.t(), chunk_rows=5))


def test_bad_arguments_say_what_is_wrong():
    h, w, y = _problem()
    with pytest.raises(ValueError, match="chunk_rows must be >= 1"):
        chunked_lm_loss(h, y, lambda x: x @ w.t(), chunk_rows=0)
    with pytest.raises(ValueError, match="needs chunk_rows or vocab_size"):
        chunked_lm_loss(h, y, lambda x: x @ w.t())
    with pytest.raises(ValueError, match="21 token states but 18 targets"):
        chunked_lm_loss(h, y[:, 1:], lambda x: x @ w.t(), chunk_rows=4)
    assert default_chunk_rows(49_152) == 341 and default_chunk_rows(32_000) == 524


def _wrapped(model_name, spec, techniques=None, num_labels=None):
    s = parse_spec(spec)
    torch.manual_seed(0)
    return memtune.wrap(load_model(model_name), memtune.config_for(s.method, s.options), num_labels=num_labels,
                        techniques=techniques)


def _loss_and_grads(model, batch):
    model.train()
    torch.manual_seed(1)
    out = model(**batch)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_name,spec", [("tiny-llama", "full"), ("tiny-llama", "lora"), ("tiny-llama", "qst"),
                                             ("tiny-llama", "lst"), ("tiny-t5", "lst"), ("tiny-t5", "full")])
def test_model_losses_and_gradients_equal_the_plain_step(model_name, spec):
    plain = _wrapped(model_name, spec)
    chunked = _wrapped(model_name, spec, "chunked_ce")
    chunked.lm_loss_chunk_rows = 5                                      # several chunks on a 2 × 12 batch
    assert chunked.chunked_ce and not plain.chunked_ce
    seq2seq = plain.objective == "seq2seq"
    batch = tiny_batch(plain, batch_size=2, length=12, labels=not seq2seq)
    if seq2seq:                                                         # targets of 7 tokens, one padded
        batch["labels"] = batch["input_ids"][:, :7].clone()
        batch["labels"][1, 5:] = -100
    out_a, grads_a = _loss_and_grads(plain, batch)
    out_b, grads_b = _loss_and_grads(chunked, batch)
    assert out_b.logits is None and out_a.logits is not None            # no vocabulary-wide logits kept
    assert abs(out_b.loss.item() - out_a.loss.item()) <= 16 * EPS * out_a.loss.item()
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n, g in grads_a.items():
        # The loss's gradient is summed in another order, then goes through the same backward: relative to
        # the largest entry, a few dozen fp32 roundings at most on these 2-4 block models.
        torch.testing.assert_close(grads_b[n], g, rtol=0, atol=256 * EPS * max(g.abs().max().item(), 1e-30),
                                   msg=lambda m, n=n: f"{spec}: {n}: {m}")
    with torch.no_grad():                                              # evaluation: the logits as usual
        chunked.eval()
        assert chunked(**batch).logits is not None


def test_step_keeps_no_vocabulary_wide_logits():
    """The saved fp32 logits (N×V) and their gradient are gone: the activation peak falls by at least one N×V
    fp32 tensor less what the chunked loss keeps (its N×d input gradient and one chunk's logits, its softmax
    and their gradient)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, d, chunk = 2048, 32, 4
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    reports = {}
    for t in (None, "chunked_ce"):
        torch.manual_seed(0)
        model = memtune.wrap(LlamaForCausalLM(cfg), "lora", techniques=t)
        model.lm_loss_chunk_rows = chunk
        model.train()
        batch = {"input_ids": torch.randint(0, vocab, (4, 32)), "attention_mask": torch.ones(4, 32, dtype=torch.long)}
        batch["labels"] = batch["input_ids"].clone()
        reports[t] = measure_training_memory(model, batch, torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-3))
    n = 4 * 31
    saved = reports[None].activation_peak_bytes - reports["chunked_ce"].activation_peak_bytes
    assert saved >= 4 * n * vocab - 4 * n * d - 3 * 4 * chunk * vocab


def test_plan_matches_the_cpu_tracker_and_cuts_the_logits():
    settings = PlanSettings(model="tiny-llama", batch_size=2, max_length=32, device="cpu")
    result = plan(settings, "lora+chunked_ce,full+chunked_ce")
    for mp in result.methods:
        assert mp.status == "ok", mp.message
        _, real = measure_real(settings, mp)
        assert mp.peak_bytes == real.peak_bytes and mp.activation_peak_bytes == real.activation_peak_bytes, mp.label
    big = plan(PlanSettings(model="smollm2-135m", batch_size=2, max_length=512, layers=1), "lora,lora+chunked_ce")
    plain, chunked = big.methods
    # 2 × 511 positions × 49,152 words in fp32 is 201 MB per logits-sized tensor: the plain step holds the logits,
    # their fp32 shifted copy and the log-softmax at once, the chunked one a third of a copy (341 rows) thrice.
    assert plain.activation_peak_bytes - chunked.activation_peak_bytes > 2 * 511 * 49_152 * 4


def test_technique_name_and_refusal():
    assert MemoryTechniques.from_names("nf4+chunked_ce").names() == ("nf4", "chunked_ce")
    assert not MemoryTechniques.for_loading({"chunked_ce": True, "quantize": "nf4"}).chunked_ce
    with pytest.raises(ConfigError, match="chunked_ce chunks the vocabulary-wide loss.*classification"):
        _wrapped("tiny-bert", "lora", "chunked_ce", num_labels=2)


def test_train_with_the_flag_equals_the_plain_run(tmp_path):
    """`memtune train --chunked-ce`: the same training losses step by step and the same test perplexity (the
    evaluation computes logits as usual)."""
    from memtune.train import train

    from .test_train import tiny_args

    runs = {}
    for flag in (False, True):
        runs[flag] = train(tiny_args(tmp_path, model="tiny-llama", objective="causal-lm", max_steps=3,
                                     chunked_ce=flag, out=str(tmp_path / f"run-{flag}")))
    plain, chunked = runs[False], runs[True]
    assert chunked["settings"]["chunked_ce"] and not plain["settings"]["chunked_ce"]
    assert chunked["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-4)
    assert chunked["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-4)

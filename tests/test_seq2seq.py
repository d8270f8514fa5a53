"""Text-to-text training on encoder-decoders (`objective="seq2seq"`): the loss and logits equal transformers'
T5ForConditionalGeneration, generation equals its greedy search, label words are scored and matched, LST's
Fisher importance goes through the LM loss, and `memtune train/eval/predict/plan` run with it."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import T5ForConditionalGeneration

import memtune
from memtune.data import TaskError
from memtune.data.collate import make_collate
from memtune.methods import ConfigError
from memtune.methods.lst import LSTConfig
from memtune.metrics import classification_metrics
from memtune.seq2seq import (greedy_generate, label_targets, label_words_for, match_targets, score_label_words)
from memtune.tokenizer import char_tokenizer

EOS = 1      # T5Config's default eos_token_id, which tiny-t5 keeps


def t5_pair(method="full", seed=0):
    """(memtune model on tiny-t5 with the seq2seq objective, T5ForConditionalGeneration with the same weights)."""
    torch.manual_seed(seed)
    loaded = memtune.load_model("tiny-t5")
    model = memtune.wrap(loaded, method).eval()
    reference = T5ForConditionalGeneration(loaded.model.config)
    missing, unexpected = reference.load_state_dict(loaded.model.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}       # tied to `shared`
    reference.tie_weights()
    assert reference.lm_head.weight.data_ptr() == reference.shared.weight.data_ptr()
    return model, reference.eval()


def inputs(batch=3, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0                                                     # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def test_objective_is_seq2seq_without_a_head_and_refused_on_encoders():
    model = memtune.wrap(memtune.load_model("tiny-t5"), "lora")
    assert model.objective == "seq2seq" and model.head is None and model.per_token
    with pytest.raises(ConfigError, match="encoder-decoders a text-to-text"):
        memtune.wrap(memtune.load_model("tiny-bert"), "lora")
    with pytest.raises(ConfigError, match="linear probe has nothing to train on a seq2seq"):
        memtune.wrap(memtune.load_model("tiny-t5"), "linear")


def test_full_model_logits_and_loss_equal_t5_for_conditional_generation():
    model, ref = t5_pair("full")
    x = inputs()
    labels = torch.tensor([[7, 8, EOS], [9, EOS, -100], [10, 11, EOS]])
    with torch.no_grad():
        ours = model(**x, labels=labels)
        theirs = ref(**x, labels=labels)
    # Same kernels in the same order (the backbone protocol is the HF model's own modules): equal up to the
    # float32 rounding of a differently fused LM-head scale (o·d^-1/2 before vs after the projection).
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)


def test_greedy_generation_equals_transformers_greedy_search():
    model, ref = t5_pair("full")
    x = inputs()
    ours = greedy_generate(model, x, max_new_tokens=5, eos_id=EOS)
    theirs = ref.generate(**x, max_new_tokens=5, do_sample=False, num_beams=1)[:, 1:]      # drop the start token
    # transformers pads a finished row with the pad id, memtune repeats EOS: compare up to the first EOS.
    for a, b in zip(ours.tolist(), theirs.tolist()):
        cut = a.index(EOS) + 1 if EOS in a else len(a)
        assert a[:cut] == b[:cut]


def test_generic_greedy_generation_equals_lst_cached_generate():
    torch.manual_seed(0)
    model = memtune.wrap(memtune.load_model("tiny-t5"), LSTConfig(init="random")).eval()
    with torch.no_grad():
        for p in model.up.parameters():                                 # a non-zero side output
            p.normal_(0, 0.5)
    x = inputs()
    ours = greedy_generate(model, x, max_new_tokens=4, eos_id=EOS)
    cached = model.generate(x["input_ids"], x["attention_mask"], max_new_tokens=4, stop_at_eos=False)[:, 1:]
    for a, b in zip(ours.tolist(), cached.tolist()):
        cut = a.index(EOS) + 1 if EOS in a else len(a)
        assert a[:cut] == b[:cut]


def test_label_word_scores_are_summed_token_log_likelihoods():
    model, _ = t5_pair("full")
    x = inputs()
    targets = [[7, 8, EOS], [9, EOS]]
    scores = score_label_words(model, x, targets)                       # B×C
    for c, t in enumerate(targets):
        labels = torch.tensor(t).expand(3, -1)
        with torch.no_grad():
            logp = torch.log_softmax(model(**x, labels=labels).logits.float(), -1)
        manual = sum(logp[:, i, tok] for i, tok in enumerate(t))
        torch.testing.assert_close(scores[:, c], manual)
        # The mean token loss of a batch of one times the length is the negative score.
        with torch.no_grad():
            loss = model(input_ids=x["input_ids"][1:2], attention_mask=x["attention_mask"][1:2],
                         labels=labels[1:2]).loss
        torch.testing.assert_close(-loss * len(t), scores[1, c], rtol=1e-5, atol=1e-5)


def test_match_targets_needs_the_exact_label_ids_up_to_eos():
    targets = [[7, 8, EOS], [9, EOS]]
    generated = torch.tensor([[7, 8, EOS, EOS], [9, EOS, 4, 4], [7, 9, EOS, EOS], [7, 8, 3, 3]])
    assert match_targets(generated, targets, EOS).tolist() == [0, 1, -1, -1]


def test_label_words_from_names_lists_and_pairs():
    names = ["negative", "positive"]
    assert label_words_for(names, None) == names
    assert label_words_for(names, "bad, good") == ["bad", "good"]
    assert label_words_for(names, "positive=good") == ["negative", "good"]
    with pytest.raises(TaskError, match="3 words for 2 classes"):
        label_words_for(names, "a,b,c")
    with pytest.raises(TaskError, match="'neutral' is not a class"):
        label_words_for(names, "neutral=meh")
    with pytest.raises(TaskError, match="share a label word"):
        label_words_for(names, "same,same")
    with pytest.raises(TaskError, match="not a mix"):
        label_words_for(names, "bad,positive=good")


def test_collation_gives_target_ids_padded_and_the_class_ids():
    tok = char_tokenizer()
    targets = label_targets(tok, ["no", "yes"], EOS)
    assert targets == [tok("no", add_special_tokens=False)["input_ids"] + [EOS],
                       tok("yes", add_special_tokens=False)["input_ids"] + [EOS]]
    collate = make_collate("text", tok, max_length=16, label_targets=targets)
    batch = collate([{"text": "a b", "label": 1}, {"text": "c", "label": 0}])
    assert batch["label_ids"].tolist() == [1, 0]
    assert batch["labels"][0].tolist() == targets[1]
    assert batch["labels"][1].tolist() == targets[0] + [-100] * (len(targets[1]) - len(targets[0]))
    with pytest.raises(TaskError, match="exclude each other"):
        make_collate("text", tok, label_targets=targets, regression=True)


def test_generation_that_names_no_class_is_wrong_and_no_false_positive():
    # Two of four name no class (-1). Class 1: TP 1, FP 0, FN 2 (one invalid, one predicted 0) → F1 2/(2+0+2).
    # Class 0: TP 0 (its one example is invalid), FP 1 → F1 0. An invalid output is a false positive of none.
    m = classification_metrics([-1, 1, -1, 0], [0, 1, 1, 1], 2)
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["f1"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(0.25)


@pytest.mark.parametrize("name,method", [("tiny-t5", m) for m in ("lst", "lora", "ia3", "adapter", "sherl", "meft1",
                                                                   "full")] + [("tiny-bart", "bitfit"),
                                                                              ("tiny-bart", "lst")])
def test_methods_train_only_their_parameters_on_the_lm_loss(name, method):
    torch.manual_seed(0)
    model = memtune.wrap(memtune.load_model(name), method).train()
    assert model.objective == "seq2seq"
    x = inputs()
    labels = torch.tensor([[7, 8, EOS], [9, EOS, -100], [10, 11, EOS]])
    out = model(**x, labels=labels)
    assert out.logits.shape == (3, 3, model.backbone.config.vocab_size)
    out.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    declared = {n for n, _ in model.trainable_named_parameters()}
    assert trained and trained <= declared
    assert all(p.grad is None for n, p in model.named_parameters() if n not in declared)


def test_lst_fisher_importance_goes_through_the_lm_loss():
    model, ref = t5_pair(LSTConfig(init="fisher"))
    x = {k: v[:1] for k, v in inputs().items()}
    labels = torch.tensor([[7, 8, EOS]])
    with torch.no_grad():
        torch.testing.assert_close(model.pretrained_loss({**x, "labels": labels}), ref(**x, labels=labels).loss,
                                   rtol=1e-5, atol=1e-6)
    before = {n: p.clone() for n, p in model.trainable_named_parameters()}     # magnitude-pruned start
    used = model.initialize_from_fisher([{**x, "labels": labels}] * 2, samples=2)
    assert used == 2
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


def test_plan_of_the_text_to_text_step_matches_its_measurement():
    from memtune.memory.plan import PlanSettings
    from memtune.memory.real_step import build_real_step

    from .memory.test_plan import assert_agrees

    settings = PlanSettings(model="tiny-t5", batch_size=2, max_length=16, objective="seq2seq", target_length=4,
                            device="cpu")
    assert assert_agrees(settings, "full,lora,lst,sherl") == 4
    step = build_real_step(settings, "lst", {})
    assert step.model.objective == "seq2seq" and step.batch["labels"].shape == (2, 4)


def _pair_csv(tmp_path, n=48):
    p = tmp_path / "pairs.csv"
    rows = [f"{'a cat' if i % 2 else 'a dog'} {i},the same {i},{'yes' if i % 2 else 'no'}\n" for i in range(n)]
    p.write_text("first,second,label\n" + "".join(rows))
    return p


# Steps and learning rate for a random tiny-t5 to learn the answer format (LST's side network starts from a
# zero output and needs more steps than the methods that start from the backbone's own decoder).
CLI_RUNS = {"lst": ("80", "1e-2"), "lora": ("40", "1e-2"), "full": ("40", "3e-3")}


@pytest.mark.parametrize("method", sorted(CLI_RUNS))
def test_cli_trains_a_pair_task_text_to_text_and_eval_reproduces_it(tmp_path, capsys, method):
    from memtune.cli import main

    p = _pair_csv(tmp_path)
    run = tmp_path / "run"
    steps, lr = CLI_RUNS[method]
    assert main(["train", "--model", "tiny-t5", "--task", f"csv:{p}", "--text-column", "first,second",
                 "--objective", "seq2seq", "--method", method, "--max-steps", steps, "--batch-size", "8",
                 "--lr", lr, "--max-length", "32", "--out", str(run), "--no-progress"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert {"accuracy", "accuracy_scored", "invalid_generations", "f1"} <= set(m)
    # The model has learnt the answer format: it generates label words, not other text.
    assert m["invalid_generations"] < 0.5
    saved = json.loads((run / "adapter_config.json").read_text())
    assert saved["objective"] == "seq2seq" and saved["label_words"] == ["no", "yes"]
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-t5", "--adapter", str(run), "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for k in ("accuracy", "accuracy_scored", "invalid_generations", "f1"):
        assert out[k] == m[k]
    assert main(["predict", "--model", "tiny-t5", "--adapter", str(run), "--text", "a cat", "--json"]) == 0
    pred = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(pred["probabilities"]) == {"no", "yes"}
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0)


def test_cli_refuses_seq2seq_where_it_cannot_apply(tmp_path, capsys):
    from memtune.cli import main

    p = _pair_csv(tmp_path, n=8)
    base = ["train", "--task", f"csv:{p}", "--text-column", "first,second", "--max-steps", "1", "--no-progress"]
    assert main(base + ["--model", "tiny-bert", "--objective", "seq2seq", "--out", str(tmp_path / "a")]) == 2
    assert "needs an encoder-decoder model" in capsys.readouterr().err
    assert main(base + ["--model", "tiny-t5", "--label-words", "n,y", "--out", str(tmp_path / "b")]) == 2
    assert "--label-words applies to --objective seq2seq" in capsys.readouterr().err

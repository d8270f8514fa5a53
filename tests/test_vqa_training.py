"""Training on the offline VQA tasks (memtune issue #18): the VQA task as an "image_text" Task, its collation, the
VISION+TEXT model alias, the baselines' visual prefix (docs/methods/vl.md §4) against LST's side-only mode A, and
`memtune train` / `memtune eval` end to end on tiny-vl-bert and tiny-vl-t5."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import memtune
from memtune.backbones.visual_embedding import VisualEmbedding
from memtune.cli import main
from memtune.data import TaskError, load_task, make_collate
from memtune.data.collate import ImageCollator, TextCollator
from memtune.data.image_text_collate import ImageTextProcessor
from memtune.models import ModelError
from memtune.seq2seq import label_targets
from memtune.techniques import MemoryTechniques

V = 36                     # the default 6×6 pooled grid of a composition


# -- the task ----------------------------------------------------------------------------------------------------
def test_vqa_task_is_an_image_text_task_with_the_answers_as_classes():
    task = load_task("digits-vqa/B1")
    assert task.kind == "image_text" and task.name == "digits-vqa/B1" and task.label_names == ["yes", "no"]
    assert (len(task.train), len(task.test)) == (2000, 500)           # the generator's default counts
    ex = task.train[0]
    assert set(ex) == {"text", "image", "label", "template"} and ex["image"].shape == (8, 8)
    assert ex["text"].startswith("is this a") and task.label_names[ex["label"]] in ("yes", "no")
    assert Counter(e["label"] for e in task.train) == {0: 1000, 1: 1000}   # the generator's balanced units
    # A template set joins the answer vocabularies (each answer once) and leaves the two-image B5 out.
    every = load_task("digits-vqa")
    assert every.label_names[:4] == ["yes", "no", "first", "second"] and every.label_names[4:] == \
        [str(i) for i in range(19)]
    assert {e["template"] for e in every.train} == {"B1", "B2", "B3", "B4", "C1", "C2"}
    assert load_task("fashion-vqa/C1", train_limit=10, test_limit=10).label_names[0] == "t-shirt/top"


def test_vqa_limits_and_seed_behave_as_for_other_tasks():
    a = load_task("digits-vqa/C1", seed=1, train_limit=50, test_limit=20)
    b = load_task("digits-vqa/C1", seed=1, train_limit=50, test_limit=20)
    c = load_task("digits-vqa/C1", seed=2, train_limit=50, test_limit=20)
    assert (len(a.train), len(a.test)) == (50, 20)
    assert [e["text"] for e in a.train] == [e["text"] for e in b.train]
    assert all((x["image"] == y["image"]).all() for x, y in zip(a.train, b.train))
    assert [e["label"] for e in a.train] != [e["label"] for e in c.train]      # the seed picks the subset
    assert sorted(Counter(e["label"] for e in a.train).values()) == [5] * 10  # class-stratified
    # The data itself never depends on the seed: every subset is drawn from the same generated examples.
    full = {(e["text"], e["image"].tobytes()) for e in load_task("digits-vqa/C1").train}
    assert all((e["text"], e["image"].tobytes()) in full for e in c.train)


def test_unknown_vqa_name_says_what_works():
    # (The two-image template B5 trains when named: tests/test_vqa_two_images.py.)
    with pytest.raises(TaskError, match="digits-vqa, fashion-vqa"):
        load_task("digit-vqa/B1")


# -- collation -----------------------------------------------------------------------------------------------------
def test_collate_joins_the_text_and_image_collators():
    loaded = memtune.load_model("tiny-vl-bert")
    task = load_task("digits-vqa/B1", train_limit=6, test_limit=2)
    collate = make_collate(task.kind, loaded.preprocessor, max_length=32)
    batch = collate(task.train)
    tok, proc = loaded.preprocessor.tokenizer, loaded.preprocessor.image_processor
    text = TextCollator(tok, 32, False, False)(task.train)
    assert proc.size["height"] == 32
    image = ImageCollator(32, proc.image_mean, proc.image_std)(task.train)
    assert set(batch) == {*text, "pixel_values"}
    for k in text:
        assert torch.equal(batch[k], text[k])
    assert torch.equal(batch["pixel_values"], image["pixel_values"]) and batch["pixel_values"].shape == (6, 3, 32, 32)
    assert torch.equal(batch["labels"], torch.tensor([e["label"] for e in task.train]))
    # image_size overrides the vision processor's size; text-to-text labels are the answer words' target ids.
    targets = label_targets(tok, task.label_names, 2)
    s2s = make_collate(task.kind, loaded.preprocessor, image_size=16, label_targets=targets)(task.train[:2])
    assert s2s["pixel_values"].shape == (2, 3, 16, 16)
    assert torch.equal(s2s["label_ids"], batch["labels"][:2])
    for row, c in zip(s2s["labels"].tolist(), s2s["label_ids"].tolist()):
        assert [t for t in row if t != -100] == targets[c]
    with pytest.raises(TaskError, match="mixes one-image and two-image examples"):
        collate([{**task.train[0], "image2": task.train[1]["image"]}, task.train[1]])


def test_vision_plus_text_alias_loads_a_composition():
    loaded = memtune.load_model("tiny-vit+tiny-t5")
    assert loaded.modality == "image_text" and isinstance(loaded.preprocessor, ImageTextProcessor)
    assert loaded.model.config.model_type == "image_text" and loaded.name == "tiny-vit+tiny-t5"
    # It behaves as the text model's tokenizer (label words, padding), and carries the image processor.
    assert loaded.preprocessor("7")["input_ids"] == loaded.preprocessor.tokenizer("7")["input_ids"]
    assert loaded.preprocessor.pad_token == loaded.preprocessor.tokenizer.pad_token
    assert loaded.preprocessor.image_processor.size["height"] == 32
    with pytest.raises(ModelError, match="'tiny-t5' must be an image model"):
        memtune.load_model("tiny-t5+tiny-vit")
    with pytest.raises(ModelError, match="two model names joined by one"):
        memtune.load_model("tiny-vit+")


# -- the visual prefix (mode B) of the baselines, against LST's mode A --------------------------------------------
BASELINES = [("full", None), ("lora", None), ("lora", MemoryTechniques(gradient_checkpointing=True)),
             ("adapter", None)]
BASELINE_IDS = ["full", "lora", "lora+gc", "adapter"]
# (alias, num_labels): BERT classification, T5 text-to-text.
FORMS = [("tiny-vl-bert", 3), ("tiny-vl-t5", None)]
FORM_IDS = ["bert", "t5-seq2seq"]


def wrap(alias, method, num_labels, techniques=None, seed=0):
    torch.manual_seed(seed)
    return memtune.wrap(memtune.load_model(alias), method, num_labels=num_labels, techniques=techniques)


def vl_batch(model, b=3, t=6, seed=1):
    """Token ids B×T (example 0 right-padded by 2), pixels B×3×32×32, class labels or target ids B×3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t - 2:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask, "pixel_values": torch.rand(b, 3, 32, 32, generator=g)}
    batch["labels"] = (torch.randint(5, 60, (b, 3), generator=g) if model.objective == "seq2seq"
                       else torch.arange(b) % model.num_labels)
    return batch


def prefix_count(bb) -> int:
    return VisualEmbedding.parameter_count(bb.visual_width, bb.hidden_size, V, bb.prefix_norm)


@pytest.mark.parametrize("alias,num_labels", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("method,techniques", BASELINES, ids=BASELINE_IDS)
def test_baseline_trains_the_visual_prefix_and_never_the_vision_encoder(alias, num_labels, method, techniques):
    model = wrap(alias, method, num_labels, techniques).train()
    bb = model.backbone
    names = [n for n, _ in model.trainable_named_parameters()]
    prefix = [n for n in names if n.startswith("backbone.visual_prefix.")]
    assert sum(p.numel() for n, p in model.named_parameters() if n in prefix) == prefix_count(bb)
    assert not any(n.startswith("backbone.vision.") for n in names)
    # The trainable set is the method's own rule plus the prefix (nothing else is switched on).
    assert set(names) - set(prefix) == {n for n, _ in model.named_parameters() if model.is_trainable(n)
                                        and not n.startswith(("backbone.visual_prefix.", "backbone.vision."))}
    model(**vl_batch(model)).loss.backward()
    for n, p in model.named_parameters():
        if n.startswith("backbone.visual_prefix."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        if n.startswith("backbone.vision."):
            assert p.grad is None and not p.requires_grad, n


def test_prefix_output_weight_at_zero_gives_the_projection_no_gradient():
    """The prefix's only route to the loss is through its own output: zeroing the norm's gain stops W_v's
    gradient exactly (the codes t_v and p_k still train), so the gradient above is not from elsewhere."""
    model = wrap("tiny-vl-bert", "lora", 3).train()
    with torch.no_grad():
        model.backbone.visual_prefix.norm.weight.zero_()
    model(**vl_batch(model)).loss.backward()
    prefix = model.backbone.visual_prefix
    assert torch.count_nonzero(prefix.proj.weight.grad) == 0 and torch.count_nonzero(prefix.proj.bias.grad) == 0
    assert prefix.position_codes.grad.abs().sum() > 0


@pytest.mark.parametrize("alias,num_labels", FORMS, ids=FORM_IDS)
def test_prefix_puts_the_image_before_the_text_in_the_backbone(alias, num_labels):
    model = wrap(alias, "lora", num_labels).eval()
    bb = model.backbone
    batch = vl_batch(model)
    h, ctx = bb.embed(batch)
    B, T = batch["input_ids"].shape
    assert h.shape == (B, V + T, bb.hidden_size) and ctx["visual_prefix_length"] == V
    assert torch.equal(ctx["token_mask"], torch.cat([torch.ones(B, V, dtype=torch.long), batch["attention_mask"]], 1))
    # The prefix is exactly the visual embedding of the frozen visual tokens; the text part is the family's own.
    assert torch.equal(h[:, :V], bb.visual_prefix(bb.visual_tokens(batch)))
    plain = memtune.wrap(memtune.load_model(alias.replace("vl-", "")), "lora", num_labels=num_labels).backbone
    plain.model.load_state_dict(bb.model.state_dict())
    assert torch.equal(h[:, V:], plain.eval().embed(batch)[0])
    if bb.is_encoder_decoder:      # the decoder cross-attends to all V+T encoder positions
        batch["decoder_input_ids"] = bb.shift_right(batch.pop("labels"))
        assert bb(batch)[0].shape == (B, 1 + 2, bb.hidden_size)


@pytest.mark.parametrize("alias,num_labels", FORMS, ids=FORM_IDS)
def test_the_image_reaches_the_baselines_backbone_but_never_lsts(alias, num_labels):
    def states(model, pixels):
        """Every text-backbone encoder block output, for one image batch."""
        batch = {**vl_batch(model), "pixel_values": pixels}
        bb = model.backbone
        h, ctx = bb.embed(batch)
        return bb.forward_intermediates(h, ctx, range(bb.num_layers))[1]

    g = torch.Generator().manual_seed(5)
    one, other = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    lora = wrap(alias, "lora", num_labels).eval()
    assert all(not torch.equal(a, b) for a, b in zip(states(lora, one), states(lora, other)))
    lst = wrap(alias, "lst", num_labels).eval()
    assert lst.backbone.visual_prefix is None and not any("visual_prefix" in n for n, _ in lst.named_parameters())
    assert all(torch.equal(a, b) for a, b in zip(states(lst, one), states(lst, other)))
    # ... while LST's own output does depend on the image (through its side network).
    with torch.no_grad():
        lst.up.weight.normal_(0, 3)
        outs = [lst(**{**vl_batch(lst), "pixel_values": px}).logits for px in (one, other)]
    assert not torch.equal(*outs)


@pytest.mark.parametrize("alias,num_labels", FORMS, ids=FORM_IDS)
def test_saved_baseline_keeps_its_prefix(alias, num_labels, tmp_path):
    model = wrap(alias, "lora", num_labels).eval()
    with torch.no_grad():
        model.backbone.visual_prefix.proj.weight.normal_()              # away from any re-initialisation
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)
    loaded = memtune.load(alias, tmp_path).eval()
    batch = vl_batch(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


# -- the CLI, end to end -------------------------------------------------------------------------------------------
def train_and_eval(capsys, tmp_path, model, task, method, *extra, train_limit=40, test_limit=20, steps=4):
    """`memtune train` into tmp_path/method, then `memtune eval` of the saved run: (metrics.json, eval's JSON)."""
    out = tmp_path / method
    assert main(["train", "--model", model, "--task", task, "--method", method, "--train-limit", str(train_limit),
                 "--test-limit", str(test_limit), "--batch-size", "8", "--max-steps", str(steps), "--lr", "1e-2",
                 "--max-length", "24", "--no-progress", "--out", str(out), *extra]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--model", model, "--adapter", str(out), "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return metrics, evaluated


@pytest.mark.parametrize("method", ["lora", "full", "lst"])
def test_cli_trains_and_evaluates_a_vqa_task(method, capsys, tmp_path):
    metrics, evaluated = train_and_eval(capsys, tmp_path, "tiny-vl-bert", "digits-vqa/C1", method)
    assert metrics["task"] == "digits-vqa/C1" and metrics["steps"] == 4 and metrics["test_examples"] == 20
    assert metrics["main_metric"] == "accuracy" and 0.0 <= metrics["accuracy"] <= 1.0
    for key in ("accuracy", "macro_f1", "mcc"):
        assert evaluated[key] == metrics[key], key
    prefix = 0 if method == "lst" else VisualEmbedding.parameter_count(64, 64, V, "layer")
    model = memtune.load("tiny-vl-bert", tmp_path / method)
    assert sum(p.numel() for n, p in model.trainable_named_parameters() if "visual_prefix" in n) == prefix


def test_cli_trains_text_to_text_on_the_t5_composition(capsys, tmp_path):
    metrics, evaluated = train_and_eval(capsys, tmp_path, "tiny-vl-t5", "digits-vqa/B1", "lora",
                                        "--objective", "seq2seq")
    assert "accuracy_scored" in metrics and "invalid_generations" in metrics
    for key in ("accuracy", "accuracy_scored", "invalid_generations"):
        assert evaluated[key] == metrics[key], key


# -- single-modality controls (docs/methods/vl.md §5.11) -----------------------------------------------------------
def test_ablation_removes_exactly_one_modality():
    from memtune.data.vqa_task import ablate

    examples = load_task("digits-vqa/B1", train_limit=4, test_limit=4).test
    blank, mute = ablate(examples, "image"), ablate(examples, "question")
    for ex, b, m in zip(examples, blank, mute):
        assert b["image"].shape == ex["image"].shape and b["image"].dtype == ex["image"].dtype
        assert not b["image"].any() and ex["image"].any()            # the original is left as it was
        assert (b["text"], m["text"], m["label"]) == (ex["text"], "", ex["label"])
        assert (m["image"] == ex["image"]).all()
    loaded = memtune.load_model("tiny-vl-bert")
    batch = make_collate("image_text", loaded.preprocessor, max_length=16)(mute)
    assert (batch["input_ids"] == batch["input_ids"][:1]).all()       # the text carries nothing per example
    with pytest.raises(TaskError, match="image, question"):
        ablate(examples, "text")


def test_eval_with_a_blank_image_scores_a_constant_prediction(capsys, tmp_path):
    # C1 asks one question ("what is this?"): with every image blanked all test inputs are equal, so the model
    # predicts one class for all, and the class-stratified test split (2 of each of 10 digits) scores 0.1.
    train_and_eval(capsys, tmp_path, "tiny-vl-bert", "digits-vqa/C1", "lst")
    assert main(["eval", "--model", "tiny-vl-bert", "--adapter", str(tmp_path / "lst"), "--ablate", "image",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["ablate"] == "image" and result["accuracy"] == pytest.approx(0.1)
    # --test-limit rescores on more of the split than the run did: all 500 C1 test questions, 50 per digit.
    assert main(["eval", "--model", "tiny-vl-bert", "--adapter", str(tmp_path / "lst"), "--ablate", "image",
                 "--test-limit", "all", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["eval_examples"] == 500 and result["accuracy"] == pytest.approx(0.1)
    for bad in ("0", "some"):
        with pytest.raises(SystemExit):
            main(["eval", "--model", "tiny-vl-bert", "--adapter", str(tmp_path / "lst"), "--test-limit", bad])
        assert "positive number of test examples or 'all'" in capsys.readouterr().err
    assert main(["eval", "--model", "tiny-vl-bert", "--adapter", str(tmp_path / "lst"), "--task", "digits",
                 "--ablate", "image", "--no-progress"]) == 2
    assert "--ablate applies to image-text tasks" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["qst", "dtl", "meft1"])
def test_methods_that_never_read_the_image_refuse_a_composition(method):
    with pytest.raises(memtune.methods.ConfigError, match=f"{method} does not read the image.*lora.*lst"):
        wrap("tiny-vl-bert", method, 3)

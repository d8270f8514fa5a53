"""The offline templated VQA data (memtune.data.vqa): the generator's modality check, seeding,
source splits, B5 pairs, answer vocabularies, and the user CSV/JSONL format with its errors."""

import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from memtune.data import bundled
from memtune.data.base import TaskError
from memtune.data.vqa import (
    B3_SPLITS, B4_ANSWERS, TEMPLATE_IDS, VQA_TASKS, VQAOptions, image_batch, load_vqa_file, load_vqa_task,
)

TRAIN, TEST, SIZE = 200, 100, 8  # 200 is a multiple of every balancing unit (4, 10 and 100 questions)
BINARY = ("B1", "B2", "B3", "B5")


def _require_fashion_mnist() -> None:
    if not (bundled.fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not found in {bundled.fashion_mnist_dir()} "
                    "(apt-get install dataset-fashion-mnist, or set MEMTUNE_FASHION_MNIST)")


@pytest.fixture(scope="module", params=["digits-vqa", "fashion-vqa"])
def task(request):
    if request.param == "fashion-vqa":
        _require_fashion_mnist()
    return load_vqa_task(request.param, seed=0, train_per_template=TRAIN, test_per_template=TEST, size=SIZE)


def majority_accuracy(keys, answers) -> float:
    """Empirical Bayes accuracy of predicting the majority answer of each key (in-sample)."""
    by_key = defaultdict(Counter)
    for k, a in zip(keys, answers):
        by_key[k][a] += 1
    return sum(max(c.values()) for c in by_key.values()) / len(answers)


def tolerance(chance: float, n: int) -> float:
    """Three binomial standard errors of an accuracy measured on n answers at rate `chance`."""
    return 3 * math.sqrt(chance * (1 - chance) / n)


def _label_keys(examples):
    # One image: its class; B5: the ordered class pair.
    return [ex.classes for ex in examples]


# ------------------------------------------------------------------------------ the generator check
def test_single_modality_predictors_stay_at_chance_and_controls_flip(task):
    for t in task.templates:
        ex = task.examples(t)
        answers = [e.answer for e in ex]
        text_only = majority_accuracy([e.question for e in ex], answers)
        label_only = majority_accuracy(_label_keys(ex), answers)
        both = majority_accuracy([(e.question, e.classes) for e in ex], answers)
        chance, tol = task.chance[t], tolerance(task.chance[t], len(ex))
        assert both == 1.0, t  # the answer follows from question + image class(es): the task is solvable
        if t == "C1":
            assert label_only == 1.0 and text_only <= chance + tol
        elif t == "C2":
            assert text_only == 1.0 and label_only <= chance + tol
        else:
            assert text_only <= chance + tol, (t, text_only)
            assert label_only <= chance + tol, (t, label_only)
    b5 = task.examples("B5")  # one image of the pair alone is no better
    for slot in (0, 1):
        acc = majority_accuracy([e.classes[slot] for e in b5], [e.answer for e in b5])
        assert acc <= 0.5 + tolerance(0.5, len(b5))


def test_balanced_units_give_exactly_chance_in_sample(task):
    # With counts a multiple of the units, every question string and every class has each answer equally
    # often, for the training and the test set alike.
    for split in ("train", "test"):
        for t in BINARY + ("B4",):
            if t not in task.templates:
                continue
            ex = task.examples(t, split)
            answers = [e.answer for e in ex]
            assert majority_accuracy([e.question for e in ex], answers) == pytest.approx(task.chance[t], abs=1e-12)
            assert majority_accuracy(_label_keys(ex), answers) == pytest.approx(task.chance[t], abs=1e-12)


def test_counts_off_the_unit_stay_within_the_cut_off_bound():
    # 230 is no multiple of the 4-, 10- and 100-question units: the examples cut from the last unit can raise
    # a single-modality accuracy by at most chance * (unit - 1) / count.
    unit = {"B1": 4, "B2": 4, "B3": 4, "B4": 100, "B5": 4, "C1": 10, "C2": 100}
    task = load_vqa_task("digits-vqa", seed=1, train_per_template=230, test_per_template=4, size=SIZE)
    for t in task.templates:
        ex = task.examples(t)
        answers, bound = [e.answer for e in ex], task.chance[t] * (1 + (unit[t] - 1) / len(ex))
        if t != "C2":
            assert majority_accuracy([e.question for e in ex], answers) <= bound + 1e-12, t
        if t != "C1":
            assert majority_accuracy(_label_keys(ex), answers) <= bound + 1e-12, t


def test_independent_answers_would_fail_the_check():
    # Negative control of the check itself: a B2 whose answer names the class is solved from the image.
    task = load_vqa_task("digits-vqa/B2", train_per_template=TRAIN, test_per_template=4, size=SIZE)
    ex = task.train
    leaky = [e.question.split()[3] if e.answer == "first" else e.question.split()[-1].rstrip("?") for e in ex]
    assert majority_accuracy(_label_keys(ex), leaky) == 1.0 > 0.5 + tolerance(0.5, len(ex))


def test_b1_asks_the_true_class_half_the_time(task):
    ex = task.examples("B1")
    true_asked = [e.question.rstrip("?").split(" ", 3)[3] == task.answers["C1"][e.classes[0]] for e in ex]
    assert sum(true_asked) == len(ex) // 2
    assert all(asked == (e.answer == "yes") for asked, e in zip(true_asked, ex))


def test_b3_splits_are_five_five_and_every_class_is_yes_for_half_the_questions():
    for name, splits in B3_SPLITS.items():
        assert len({members for members, _, _ in splits}) == len(splits), name
        yes_count = Counter()
        for members, yes_words, no_words in splits:
            assert len(members) == 5 and members <= set(range(10)) and yes_words != no_words
            yes_count.update(members)  # first wording
            yes_count.update(set(range(10)) - members)  # complement wording
        assert all(yes_count[c] == len(splits) for c in range(10)), name


# ----------------------------------------------------------------------------------- seeds, splits
def _fingerprint(examples):
    return [(e.template, e.question, e.answer, e.classes, e.source, e.split) for e in examples]


def test_same_seed_same_examples_other_seed_differs():
    kw = dict(train_per_template=40, test_per_template=20, size=SIZE)
    a, b = load_vqa_task("digits-vqa", seed=3, **kw), load_vqa_task("digits-vqa", seed=3, **kw)
    assert _fingerprint(a.train + a.test) == _fingerprint(b.train + b.test)
    assert all(torch.equal(x.image, y.image) for x, y in zip(a.train[:20], b.train[:20]))
    c = load_vqa_task("digits-vqa", seed=4, **kw)
    for t in a.templates:
        assert _fingerprint(a.examples(t)) != _fingerprint(c.examples(t)), t
    # One template alone is the same as that template inside the full task.
    single = load_vqa_task("digits-vqa/b5", seed=3, **kw)
    assert single.templates == ("B5",) and single.name == "digits-vqa/B5"
    assert _fingerprint(single.train) == _fingerprint(a.examples("B5"))


def test_train_and_test_come_from_their_own_source_splits(task):
    reader = bundled.fashion_mnist if task.name == "fashion-vqa" else bundled.digits
    source_train, source_test, _ = reader()
    for split, source in (("train", source_train), ("test", source_test)):
        examples = getattr(task, split)
        assert len(examples) == len(task.templates) * (TRAIN if split == "train" else TEST)
        for e in examples:
            assert e.split == split and len(e.source) == len(e.pixels) == len(e.classes)
            for i, pixels, y in zip(e.source, e.pixels, e.classes):
                # The very array of that split (no copy), and its label is the recorded class.
                assert pixels is source[i]["image"] and source[i]["label"] == y
    # The source splits share no array, so no image is in both sets.
    train_ids = {id(p) for e in task.train for p in e.pixels}
    assert not train_ids & {id(p) for e in task.test for p in e.pixels}


def test_b5_has_two_distinct_images_and_same_class_half_the_time(task):
    for split in ("train", "test"):
        ex = task.examples("B5", split)
        assert all(e.num_images == 2 and e.source[0] != e.source[1] for e in ex)
        same = sum(e.classes[0] == e.classes[1] for e in ex)
        assert abs(same / len(ex) - 0.5) <= tolerance(0.5, len(ex))
        for e in ex:  # "same" wording: true iff same class; "different" wording: true iff different
            same_pair, asks_same = e.classes[0] == e.classes[1], "same" in e.question
            assert (e.answer == "true") == (same_pair == asks_same)
        first, second = ex[0].images
        assert first.shape == second.shape == (3, SIZE, SIZE) and torch.equal(ex[0].image2, second)
    assert all(e.num_images == 1 and e.image2 is None for t in task.templates if t != "B5"
               for e in task.examples(t))


def test_answer_vocabularies_and_chance(task):
    words = task.answers["C1"]
    assert len(words) == 10 and task.answers["C2"] == words
    expected = {"B1": ("yes", "no"), "B2": ("first", "second"), "B3": ("yes", "no"), "B5": ("true", "false")}
    for t, answers in expected.items():
        assert task.answers[t] == answers and task.chance[t] == 0.5
    assert task.chance["C1"] == task.chance["C2"] == 0.1
    for t in task.templates:
        seen = {e.answer for e in task.train + task.test if e.template == t}
        assert seen == set(task.answers[t]), t  # every answer occurs, nothing outside the vocabulary
    if task.name == "digits-vqa":
        assert task.answers["B4"] == B4_ANSWERS == tuple(str(i) for i in range(19)) and task.chance["B4"] == 0.1
        for e in task.examples("B4"):
            n = int(e.question.split()[-1].rstrip("?"))
            assert e.answer == str(e.classes[0] + n)
    else:
        assert "B4" not in task.templates
    c2 = task.examples("C2")
    assert all(e.answer == words[(words.index(e.question.split("after ")[1][:-len(" in the list?")]) + 1) % 10]
               for e in c2)


def test_images_are_three_channel_floats_at_the_default_sizes():
    digits = load_vqa_task("digits-vqa/C1", train_per_template=10, test_per_template=10)
    assert digits.image_size == 56
    x = digits.train[0].image
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.max() > 0
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey repeated
    batch = image_batch(digits.train)
    assert batch.shape == (10, 3, 56, 56) and torch.allclose(batch[0], x)
    # The 8x8 source scaled back down is the source again (0..16 scaled to 0..255).
    small = load_vqa_task("digits-vqa/C1", train_per_template=10, test_per_template=10, size=8).train[0]
    assert torch.allclose(small.image[0] * 255, torch.tensor(small.pixels[0], dtype=torch.float32))
    with pytest.raises(TaskError, match="only one image"):
        image_batch(digits.train, slot=1)


def test_fashion_default_size_is_112():
    _require_fashion_mnist()
    task = load_vqa_task("fashion-vqa/B5", train_per_template=4, test_per_template=4)
    assert task.image_size == 112 and [x.shape for x in task.train[0].images] == [(3, 112, 112)] * 2


def test_describe_lists_every_template():
    task = load_vqa_task("digits-vqa", train_per_template=10, test_per_template=10, size=SIZE)
    text = task.describe()
    assert set(TEMPLATE_IDS) <= set(text.split()) and "0.10" in text and "0.50" in text
    assert set(VQA_TASKS) == {"fashion-vqa", "digits-vqa"}


def test_bad_names_and_options_are_named():
    with pytest.raises(TaskError, match=r"unknown VQA task 'cifar-vqa'.*digits-vqa"):
        load_vqa_task("cifar-vqa")
    with pytest.raises(TaskError, match="digits only"):
        load_vqa_task("fashion-vqa/B4")
    with pytest.raises(TaskError, match="template 'B9'"):
        load_vqa_task("digits-vqa/B9")
    for kwargs, option in ((dict(train_per_template=0), "train_per_template"),
                           (dict(test_per_template=2.5), "test_per_template"),
                           (dict(size=0), "size"), (dict(seed=-1), "seed"), (dict(seed=True), "seed")):
        with pytest.raises(TaskError, match=rf"VQA option {option} must be .*got"):
            VQAOptions(**kwargs)


def test_missing_fashion_mnist_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTUNE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(TaskError, match="apt-get install dataset-fashion-mnist"):
        load_vqa_task("fashion-vqa/B1")


# ---------------------------------------------------------------------------------------- user files
def _write_images(folder, names):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(folder / name)


def test_user_csv_and_jsonl_load(tmp_path):
    (tmp_path / "img").mkdir()
    _write_images(tmp_path / "img", ["a.png", "b.png"])
    rows = [("img/a.png", "img/b.png", "same?", "no", "train"), ("img/a.png", "img/a.png", "same?", "yes", "train"),
            ("img/b.png", "img/a.png", "same?", "no", "test")]
    csv_path = tmp_path / "q.csv"
    csv_path.write_text("image,image2,question,answer,split\n" + "".join(",".join(r) + "\n" for r in rows))
    task = load_vqa_file(csv_path, size=12)
    assert (len(task.train), len(task.test)) == (2, 1) and task.answers == {"file": ("no", "yes")}
    assert task.chance == {"file": 0.5}
    ex = task.train[0]
    assert ex.num_images == 2 and ex.question == "same?" and ex.answer == "no" and ex.image.shape == (3, 12, 12)
    assert ex.pixels[0] is task.train[1].pixels[0]  # one file, decoded once
    jsonl_path = tmp_path / "img" / "q.jsonl"  # image paths are relative to the file
    lines = [{"image": "a.png", "question": f"q{i}", "answer": "yes" if i % 2 else "no"} for i in range(10)]
    jsonl_path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    task = load_vqa_file(jsonl_path)
    assert len(task.train) + len(task.test) == 10 and task.test and task.image_size == 224
    assert all(e.num_images == 1 and e.split == "train" for e in task.train)


@pytest.mark.parametrize("content, message", [
    ("image,question\nimg.png,what?\n", r"column\(s\) \['answer'\] not found"),
    ("image,question,answer\nimg.png,what?,yes\nnone.png,what?,no\n", r"line 3, column 'image': image file not found"),
    ("image,question,answer\nimg.png,what?,\n", r"line 2, column 'answer' is empty"),
    ("image,image2,question,answer\nimg.png,img.png,a?,yes\nimg.png,,b?,no\n", r"line 3, column 'image2' is empty"),
    ("image,question,answer,split\nimg.png,a?,yes,train\nimg.png,b?,no,dev\n", r"line 3, column 'split'.*'dev'"),
    ("image,question,answer\nbad.png,a?,yes\n", r"line 2, column 'image': cannot read image"),
    ("image,question,answer\n", "no data rows"),
])
def test_user_csv_errors_name_row_and_column(tmp_path, content, message):
    _write_images(tmp_path, ["img.png"])
    (tmp_path / "bad.png").write_bytes(b"not a png")
    path = tmp_path / "q.csv"
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        load_vqa_file(path)


def test_user_file_errors_for_paths_and_jsonl(tmp_path):
    with pytest.raises(TaskError, match="file not found"):
        load_vqa_file(tmp_path / "missing.csv")
    with pytest.raises(TaskError, match=r"suffix '\.txt' is not one of"):
        load_vqa_file(tmp_path / "q.txt")
    path = tmp_path / "q.jsonl"
    path.write_text('{"image": "a.png", "question": "q"}\n')
    with pytest.raises(TaskError, match=r"line 1 has no field\(s\) \['answer'\]"):
        load_vqa_file(path)
    path.write_text('{"image": "a.png", "question": 3, "answer": "x"}\n')
    _write_images(tmp_path, ["a.png"])
    with pytest.raises(TaskError, match=r"line 1, column 'question': expected a string, got 3"):
        load_vqa_file(path)
    path.write_text('{"image": "a.png", "question": "q", "answer": "x"}\n')
    with pytest.raises(TaskError, match="leaves no test rows"):
        load_vqa_file(path)

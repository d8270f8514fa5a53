"""The image–caption tasks (data/caption_task.py): digits-captions, fashion-captions and captions:PATH files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from memtune.data import bundled, load_task, make_collate
from memtune.data.base import TaskError
from memtune.data.caption_task import CAPTION_TASKS, DIGIT_NAMES, METRICS


def test_digit_captions_follow_the_digits_split_and_name_the_class():
    task = load_task("digits-captions")
    train, test, names = bundled.digits()
    assert task.kind == "image_caption" and task.metrics == METRICS and task.main_metric == "rsum"
    assert (len(task.train), len(task.test), task.label_names) == (len(train), len(test), list(names))
    templates = CAPTION_TASKS["digits-captions"][1]
    seen = set()
    for ex, src in zip(task.train + task.test, list(train) + list(test)):
        assert ex["label"] == src["label"] and ex["image"] is src["image"] and ex["image"].dtype == np.uint8
        fits = [t for t in templates if ex["text"] == t.format(c=DIGIT_NAMES[ex["label"]], d=ex["label"])]
        assert len(fits) == 1, ex["text"]
        seen.add(fits[0])
    assert seen == set(templates)                        # every template is drawn


def test_captions_never_depend_on_the_seed_and_limits_stratify():
    a, b = load_task("digits-captions", seed=0), load_task("digits-captions", seed=5)
    assert [ex["text"] for ex in a.train] == [ex["text"] for ex in b.train]
    small = load_task("digits-captions", seed=1, train_limit=50, test_limit=20)
    assert len(small.train) == 50 and len(small.test) == 20
    assert set(small.label_counts("train").values()) == {5}


def test_fashion_captions_use_lower_case_class_words():
    if not (bundled.fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not found in {bundled.fashion_mnist_dir()}")
    task = load_task("fashion-captions", train_limit=40, test_limit=20)
    assert task.kind == "image_caption" and task.label_names[0] == "T-shirt/top"
    for ex in task.train:
        word = task.label_names[ex["label"]].lower().replace("/", " or ")
        assert word in ex["text"] and ex["image"].shape == (28, 28)


def test_caption_batches_collate_as_image_text():
    from memtune.models import load_model

    task = load_task("digits-captions", train_limit=20)
    collate = make_collate(task.kind, load_model("tiny-vl-bert").preprocessor, max_length=24, image_size=32)
    batch = collate(task.train[:5])
    assert batch["pixel_values"].shape == (5, 3, 32, 32) and batch["input_ids"].shape[0] == 5
    assert batch["labels"].tolist() == [ex["label"] for ex in task.train[:5]]


def _write_images(tmp_path, n):
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(n):
        Image.fromarray(np.full((6, 6), 20 * i, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")


def test_user_jsonl_with_labels_and_splits(tmp_path):
    _write_images(tmp_path, 4)
    rows = [{"image": f"img/{i}.png", "caption": f"caption {i}", "label": "even" if i % 2 == 0 else "odd",
             "split": "train" if i < 2 else "test"} for i in range(4)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = load_task(f"captions:{path}")
    assert task.kind == "image_caption" and task.label_names == ["even", "odd"]
    assert [ex["text"] for ex in task.train] == ["caption 0", "caption 1"]
    assert [ex["label"] for ex in task.test] == [0, 1] and task.test[1]["image"][0, 0] == 60


def test_user_csv_without_labels_makes_each_caption_a_class(tmp_path):
    _write_images(tmp_path, 10)
    lines = ["image,caption"] + [f"img/{i}.png,{'a cat' if i < 5 else 'a dog'}" for i in range(10)]
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    task = load_task(f"captions:{path}")
    assert task.label_names == ["a cat", "a dog"] and len(task.train) == 8 and len(task.test) == 2
    assert task.label_counts("test") == {"a cat": 1, "a dog": 1}


def test_user_file_errors_name_the_line_and_what_is_allowed(tmp_path):
    _write_images(tmp_path, 2)
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"image": "img/9.png", "caption": "x"}) + "\n")
    with pytest.raises(TaskError, match=r"line 1, column 'image': image file not found"):
        load_task(f"captions:{path}")
    path.write_text(json.dumps({"image": "img/0.png", "caption": "x", "split": "dev"}) + "\n")
    with pytest.raises(TaskError, match=r"line 1, column 'split': 'dev' is not one of \['train', 'test'\]"):
        load_task(f"captions:{path}")
    path.write_text(json.dumps({"image": "img/0.png", "text": "x"}) + "\n")
    with pytest.raises(TaskError, match="caption"):
        load_task(f"captions:{path}")
    with pytest.raises(TaskError, match=r"give a \.csv or \.jsonl file after 'captions:'"):
        load_task(f"captions:{tmp_path / 'pairs.txt'}")

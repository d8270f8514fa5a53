"""Image–caption retrieval tasks (kind "image_caption"): the bundled digits and Fashion-MNIST images, each with a
templated caption of its class, and the user format of the same.

    task = load_task("digits-captions")      # Task(kind="image_caption", metrics=("rsum", "i2t_r1", ...))
    ex = task.train[0]    # {"image": uint8 (H, W), "text": "a handwritten seven", "label": 7}
    task = load_task("captions:pairs.jsonl") # rows {"image": "img/1.png", "caption": "...", ["label"], ["split"]}

- **Captions** come from a few templates per dataset ("a photo of a {c}", "a handwritten {digit}", ...), one drawn
  per example with a fixed seed (`GENERATOR_SEED`), so the data never depends on the run's seed; as for every
  task, `seed`, `train_limit` and `test_limit` then pick class-stratified subsets in `load_task`.
- **Labels** are the image's class: retrieval metrics count a retrieved item of the query's class as a hit
  (`memtune.retrieval_metrics`), since every caption of a class fits every image of it.
- **Images** are the sources' uint8 arrays (8×8 digits, 28×28 Fashion-MNIST), with the same fixed train/test split
  as the "digits" and "fashion-mnist" tasks; the image_text collator resizes and normalises them as it does a
  VQA task's, and encodes the caption as it encodes a question.
- **User files**, `captions:PATH` (.csv with a header, or .jsonl): an `image` column (a path relative to the
  file), a `caption` column, optionally `label` (any value; equal values are one class; default: the caption
  text itself, so equal captions are one class) and `split` (train/test on every row or on none; without it a
  fixed 80/20 split stratified by class).
"""
from __future__ import annotations

import random
from pathlib import Path

from . import bundled
from .base import Task, TaskError
from .image_folder import _read_image
from .splits import stratified_split
from .user_files import SPLIT_VALUES, read_csv, read_jsonl

GENERATOR_SEED = 0
USER_PREFIX = "captions:"
USER_SPLIT_SALT = "memtune-caption-user-split-v1"
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# task name → (bundled reader, caption templates: {c} the class word(s), {d} the digit itself)
CAPTION_TASKS = {
    "digits-captions": (bundled.digits, ("a handwritten {c}", "the digit {d}", "a scanned {c}",
                                         "a small picture of the number {c}")),
    "fashion-captions": (bundled.fashion_mnist, ("a photo of a {c}", "a grey picture of a {c}",
                                                 "a {c} on a plain background", "a small image of a {c}")),
}
METRICS = ("rsum", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def is_caption_name(key: str) -> bool:
    """True for the bundled caption tasks and "captions:PATH" (lower-cased, stripped)."""
    return key in CAPTION_TASKS or key.startswith(USER_PREFIX)


def class_words(task: str, label_names) -> list[str]:
    """What a caption calls each class: digit names for digits, lower-cased class names for Fashion-MNIST
    ("T-shirt/top" → "t-shirt or top")."""
    if task == "digits-captions":
        return list(DIGIT_NAMES)
    return [name.lower().replace("/", " or ") for name in label_names]


def load_caption_task(name: str) -> Task:
    """The whole task `name`: a bundled caption task, or a user file after "captions:" (see the docstring)."""
    key = name.strip()
    if key.lower().startswith(USER_PREFIX):
        return load_caption_file(Path(key[len(USER_PREFIX):]).expanduser(), key)
    reader, templates = CAPTION_TASKS[key.lower()]
    train, test, label_names = reader()
    words = class_words(key.lower(), label_names)
    rng = random.Random(f"{GENERATOR_SEED}:{key.lower()}")      # one fixed stream: the same captions every time

    def captioned(split) -> list[dict]:
        out = []
        for ex in split:
            template = templates[rng.randrange(len(templates))]
            out.append({"image": ex["image"], "label": ex["label"],
                        "text": template.format(c=words[ex["label"]], d=ex["label"])})
        return out

    return Task(name=key.lower(), kind="image_caption", train=captioned(train), test=captioned(test),
                label_names=list(label_names), metrics=METRICS)


def load_caption_file(path: Path, name: str) -> Task:
    """A user caption file: CSV or JSONL rows with image, caption, optional label and split."""
    if not path_text_ok(path):
        raise TaskError(f"{name!r}: give a .csv or .jsonl file after 'captions:', e.g. 'captions:pairs.jsonl'")
    read = read_csv if path.suffix.lower() == ".csv" else read_jsonl
    try:                                       # label column: "label" when there is one, else the caption
        rows = read(path, "image,caption", "label")
    except TaskError as err:
        if "'label'" not in str(err):
            raise
        rows = read(path, "image,caption", "caption")
    classes = sorted({str(label).strip() for _, label, _, _ in rows})
    examples, splits, decoded = [], [], {}
    for (image, caption), label, split, line in rows:
        if not str(caption).strip():
            raise TaskError(f"{path}: line {line}, column 'caption' is empty")
        image_path = path.parent / str(image).strip()
        if image_path not in decoded:          # an image with several captions is read once
            if not image_path.is_file():
                raise TaskError(f"{path}: line {line}, column 'image': image file not found: {image_path}")
            decoded[image_path] = _read_image(image_path)
        if split is not None and str(split).strip().lower() not in SPLIT_VALUES:
            raise TaskError(f"{path}: line {line}, column 'split': {split!r} is not one of {list(SPLIT_VALUES)}")
        splits.append(None if split is None else str(split).strip().lower())
        examples.append({"image": decoded[image_path], "text": str(caption).strip(),
                         "label": classes.index(str(label).strip())})
    if any(s is None for s in splits) != all(s is None for s in splits):
        raise TaskError(f"{path}: some rows have a 'split' value and some do not; give it on every row or on none")
    if splits[0] is None:
        train_idx, test_idx = stratified_split([ex["label"] for ex in examples], salt=USER_SPLIT_SALT)
    else:
        train_idx = [i for i, s in enumerate(splits) if s == "train"]
        test_idx = [i for i, s in enumerate(splits) if s == "test"]
    if not train_idx or not test_idx:
        raise TaskError(f"{path}: the split leaves no {'train' if not train_idx else 'test'} rows ({len(rows)} rows)")
    return Task(name=name, kind="image_caption", train=[examples[i] for i in train_idx],
                test=[examples[i] for i in test_idx], label_names=classes, metrics=METRICS)


def path_text_ok(path: Path) -> bool:
    return path.suffix.lower() in (".csv", ".jsonl")

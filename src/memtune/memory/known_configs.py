"""Model architectures for planning, without weights: shipped configs, tiny aliases, local files, hub ids.

    config, source = resolve_config("t5-base")        # memtune/configs/t5-base.json, no network
    config, source = resolve_config("path/to/config.json" or "path/to/model_dir")
    config, source = resolve_config("org/model")       # hub id: downloads config.json only
    config, source = resolve_config("clip-vit-b16+t5-base")   # VISION+TEXT: an image-text composition

Shipped configs are the architecture fields of the public checkpoints (`known_models()` lists them);
`llama-7b` and `llama-3-8b` are Llama-shaped decoders of those sizes. A user's config must name its
`model_type` and the fields that fix the model's size (its backbone family's `size_fields`): transformers
would silently fill in base-model defaults for missing ones, and a plan of the wrong size is worse than an
error.

Image-text compositions (`backbones/image_text.py`, docs/methods/vl.md) are VISION+TEXT, two of the names
above joined by one '+' (as `memtune.models.load_model` reads them), or a tiny composition alias
(`tiny-vl-t5`): an `ImageTextConfig` of the two parts' configs, pooled to a 6×6 visual grid. Two shipped
configs exist for LST's CLIP-T5 (specs/vl.md §2), so that its paper setting is two known names,
`clip-rn101-grid+t5-base-vl`, rather than planner options:
- `clip-rn101-grid` is a source of pre-extracted features (model_type "visual_features",
  `memory/visual_features.py`): CLIP RN101 grid features of width 2048 on a 7×7 grid, no parameters and no
  compute in the step; it is only a composition's vision half (`known_visual_sources()`), never a model alone.
- `t5-base-vl` is t5-base with the vocabulary resized from 32,128 to 32,200, as the official VL-T5 / CLIP-T5
  code does (100 visual sentinel tokens added to T5's 32,100; `L:VL/tokenization.py`): the frozen backbone
  then counts 222,958,848 parameters, the base of the paper's "% updated".
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from ..backbones import FAMILIES
from ..backbones.image_text import TINY_COMPOSITIONS, ImageTextConfig
from ..models import TINY, ModelError, _tiny_config
from .visual_features import MODEL_TYPE as VISUAL_FEATURES
from .visual_features import VisualFeaturesConfig

# Other names people use for the shipped configs.
SYNONYMS = {
    "bert-base-uncased": "bert-base", "bert-base-cased": "bert-base", "bert-large-uncased": "bert-large",
    "bert-large-cased": "bert-large", "google-t5/t5-base": "t5-base", "google-t5/t5-large": "t5-large",
    "google-t5/t5-3b": "t5-3b", "google-t5/t5-small": "t5-small", "FacebookAI/roberta-large": "roberta-large",
    "FacebookAI/roberta-base": "roberta-base", "google/vit-base-patch16-224": "vit-b16",
    "google/vit-base-patch16-224-in21k": "vit-b16", "google/vit-large-patch16-224": "vit-l16",
    "google/vit-large-patch16-224-in21k": "vit-l16", "llama-2-7b": "llama-7b", "meta-llama/Llama-2-7b-hf": "llama-7b",
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b", "llama3-8b": "llama-3-8b",
    "sentence-transformers/all-MiniLM-L6-v2": "minilm", "sentence-transformers/all-mpnet-base-v2": "mpnet-base",
    "facebook/dinov2-small": "dinov2-s", "HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m",
    "facebook/opt-125m": "opt-125m", "facebook/opt-1.3b": "opt-1.3b", "facebook/opt-6.7b": "opt-6.7b",
    "facebook/bart-base": "bart-base", "facebook/bart-large": "bart-large",
    # Newer families (the vision towers' and Gemma 3's entries are the vision / text tower of the hub model).
    "Qwen/Qwen3-8B": "qwen3-8b", "Qwen/Qwen3-0.6B": "qwen3-0.6b", "google/gemma-2-2b": "gemma-2-2b",
    "google/gemma-3-4b-pt": "gemma-3-4b", "microsoft/Phi-3-mini-4k-instruct": "phi-3-mini-4k",
    "EleutherAI/pythia-1b": "pythia-1b", "EleutherAI/pythia-6.9b": "pythia-6.9b", "openai-community/gpt2": "gpt2",
    "microsoft/deberta-v3-base": "deberta-v3-base", "microsoft/deberta-v3-large": "deberta-v3-large",
    "answerdotai/ModernBERT-base": "modernbert-base", "answerdotai/ModernBERT-large": "modernbert-large",
    "distilbert/distilbert-base-uncased": "distilbert-base", "distilbert-base-uncased": "distilbert-base",
    "microsoft/swin-base-patch4-window7-224": "swin-b", "microsoft/swin-tiny-patch4-window7-224": "swin-t",
    "openai/clip-vit-base-patch16": "clip-vit-b16", "google/siglip-base-patch16-224": "siglip-base-patch16-224",
    "meta-llama/Llama-3.1-70B": "llama-3.1-70b",
}


def _config_dir():
    return resources.files("memtune") / "configs"


def _shipped() -> dict[str, dict]:
    """Shipped config name → its JSON."""
    return {p.name[:-5]: json.loads(p.read_text()) for p in sorted(_config_dir().iterdir(), key=lambda p: p.name)
            if p.name.endswith(".json")}


def known_models() -> list[str]:
    """Every model name `resolve_config` knows without a file or the network: shipped configs and tiny aliases
    (feature sources, which are only the vision half of a composition, are `known_visual_sources()`)."""
    shipped = [k for k, d in _shipped().items() if not _is_feature_source(d)]
    return shipped + list(TINY)


def known_visual_sources() -> list[str]:
    """Shipped sources of pre-extracted visual features (`memory/visual_features.py`): VISION halves only."""
    return [k for k, d in _shipped().items() if _is_feature_source(d)]


def _is_feature_source(d: dict) -> bool:
    return d.get("model_type") == VISUAL_FEATURES


def check_required(d: dict, where: str) -> None:
    model_type = d.get("model_type")
    if not model_type:
        raise ModelError(f"{where}: the config has no 'model_type'; supported: {', '.join(sorted(FAMILIES))}")
    if model_type not in FAMILIES:
        raise ModelError(f"{where}: model type {model_type!r} is not supported; "
                         f"supported: {', '.join(sorted(FAMILIES))}")
    required = FAMILIES[model_type].size_fields(model_type)
    missing = [k for k in required if k not in d]
    if missing:
        raise ModelError(f"{where}: a {model_type} config needs {', '.join(required)}; "
                         f"missing: {', '.join(missing)}")


def config_from_dict(d: dict, where: str):
    from transformers import AutoConfig

    check_required(d, where)
    d = {k: v for k, v in d.items() if k not in ("transformers_version", "architectures", "_name_or_path")}
    try:
        return AutoConfig.for_model(**d)
    except (TypeError, ValueError) as e:
        raise ModelError(f"{where}: the config cannot be used: {e}") from None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a readable JSON config: {e}") from None
    if not isinstance(d, dict):
        raise ModelError(f"{path}: a config.json must hold a JSON object, got {type(d).__name__}")
    return d


def resolve_config(name: str):
    """NAME (shipped config or tiny alias), a config.json file, a model folder, or a hub id → (config, source)."""
    name = str(name).strip()
    if name in TINY:
        return _tiny_config(name), f"tiny alias {name}"
    if name in TINY_COMPOSITIONS:
        return _composition(name, *TINY_COMPOSITIONS[name], alias=True)
    key = SYNONYMS.get(name, name)
    shipped = _config_dir() / f"{key}.json"
    if shipped.is_file():
        d = json.loads(shipped.read_text())
        if _is_feature_source(d):
            raise ModelError(f"{key} is a source of pre-extracted visual features, the vision half of an image-text "
                             f"composition, not a model on its own: plan VISION+TEXT, e.g. {key}+t5-base-vl")
        return config_from_dict(d, key), f"shipped config {key}"
    path = Path(os.path.expanduser(name))
    if "+" in name and not path.exists():
        parts = [part.strip() for part in name.split("+")]
        if len(parts) != 2 or not all(parts):
            raise ModelError(f"model {name!r}: an image-text composition is VISION+TEXT, two model names joined by "
                             "one '+' (e.g. clip-vit-b16+t5-base, clip-rn101-grid+t5-base-vl)")
        return _composition(name, *parts)
    if path.is_file():
        return config_from_dict(_read_json(path), str(path)), f"file {path}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name}: a model folder needs a config.json")
        return config_from_dict(_read_json(path / "config.json"), str(path)), f"folder {path}"
    if "/" in name and not name.startswith((".", "/", "~")):
        return _hub_config(name), f"hub {name}"
    raise ModelError(f"unknown model {name!r}: use a known name ({', '.join(known_models())}), "
                     "a config.json file or model folder, a Hugging Face hub id like 'org/model', or VISION+TEXT "
                     f"(an image model or a feature source ({', '.join(known_visual_sources())}) and a text model, "
                     "e.g. clip-vit-b16+t5-base)")


def _vision_part(name: str):
    """(config, source) of a composition's vision half: an image family's config or a feature source."""
    key = SYNONYMS.get(name, name)
    shipped = _config_dir() / f"{key}.json"
    if shipped.is_file():
        d = json.loads(shipped.read_text())
        if _is_feature_source(d):
            try:
                return VisualFeaturesConfig.from_dict(d, key), f"shipped features {key}"
            except ValueError as e:
                raise ModelError(str(e)) from None
    return resolve_config(name)


def _composition(name: str, vision_name: str, text_name: str, alias: bool = False):
    """VISION+TEXT → (ImageTextConfig of the two parts' configs, grid 6, source)."""
    from ..backbones import family_class
    from ..backbones.image_text import composed_family

    (vision, vsource), (text, tsource) = _vision_part(vision_name), resolve_config(text_name)
    if getattr(vision, "model_type", None) != VISUAL_FEATURES and family_class(vision).modality != "image":
        raise ModelError(f"model {name!r}: in VISION+TEXT, {vision_name!r} must be an image model or a source of "
                         f"visual features ({', '.join(known_visual_sources())}); it is a "
                         f"{vision.model_type} {family_class(vision).modality} model")
    if getattr(text, "model_type", None) == "image_text" or family_class(text).modality != "text":
        raise ModelError(f"model {name!r}: in VISION+TEXT, {text_name!r} must be a text model")
    config = ImageTextConfig(vision, text, 6, name)
    try:
        composed_family(config)
    except Exception as e:  # UnsupportedModel: a text family without a composition
        raise ModelError(f"model {name!r}: {e}") from None
    source = f"tiny composition {name}" if alias else f"composition of {vsource} and {tsource}"
    return config, source


def _hub_config(name: str):
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name, "config.json")
    except Exception as e:  # offline, unknown repo, gated repo: all mean "no config"
        raise ModelError(f"{name}: could not fetch config.json from the Hugging Face hub "
                         f"({type(e).__name__}); pass a local config.json or a known name instead") from None
    return config_from_dict(_read_json(Path(path)), name)

"""Model architectures for planning, without weights: shipped configs, tiny aliases, local files, hub ids.

    config, source = resolve_config("t5-base")        # memtune/configs/t5-base.json, no network
    config, source = resolve_config("path/to/config.json" or "path/to/model_dir")
    config, source = resolve_config("org/model")       # hub id: downloads config.json only

Shipped configs are the architecture fields of the public checkpoints (`known_models()` lists them);
`llama-7b` and `llama-3-8b` are Llama-shaped decoders of those sizes. A user's config must name its
`model_type` and the fields that fix the model's size (its backbone family's `size_fields`): transformers
would silently fill in base-model defaults for missing ones, and a plan of the wrong size is worse than an
error.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from ..backbones import FAMILIES
from ..models import TINY, ModelError, _tiny_config

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


def known_models() -> list[str]:
    """Every name `resolve_config` knows without a file or the network: shipped configs and tiny aliases."""
    shipped = sorted(p.name[:-5] for p in _config_dir().iterdir() if p.name.endswith(".json"))
    return shipped + list(TINY)


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
    key = SYNONYMS.get(name, name)
    shipped = _config_dir() / f"{key}.json"
    if shipped.is_file():
        return config_from_dict(json.loads(shipped.read_text()), key), f"shipped config {key}"
    path = Path(os.path.expanduser(name))
    if path.is_file():
        return config_from_dict(_read_json(path), str(path)), f"file {path}"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{name}: a model folder needs a config.json")
        return config_from_dict(_read_json(path / "config.json"), str(path)), f"folder {path}"
    if "/" in name and not name.startswith((".", "/", "~")):
        return _hub_config(name), f"hub {name}"
    raise ModelError(f"unknown model {name!r}: use a known name ({', '.join(known_models())}), "
                     "a config.json file or model folder, or a Hugging Face hub id like 'org/model'")


def _hub_config(name: str):
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name, "config.json")
    except Exception as e:  # offline, unknown repo, gated repo: all mean "no config"
        raise ModelError(f"{name}: could not fetch config.json from the Hugging Face hub "
                         f"({type(e).__name__}); pass a local config.json or a known name instead") from None
    return config_from_dict(_read_json(Path(path)), name)

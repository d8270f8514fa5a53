"""Save only what a method trained, PEFT-style, and load it back onto the right base model.

    DIR/adapter_config.json         method, its options, base model name + config fingerprint, head size
    DIR/adapter_model.safetensors   the trainable tensors, by their names in the wrapped model

Loading refuses another base model, another method, pickled weights and tensors that do not match.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import atomic_path, write_json
from .models import config_fingerprint

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not belong to this base model or method, or is damaged."""


def adapter_config(model) -> dict:
    return {
        "memtune_version": __version__,
        "method": model.method_config.name,
        "config": model.method_config.to_dict(),
        "base_model": model.base_name,
        "base_model_type": model.backbone.config.model_type,
        "base_fingerprint": config_fingerprint(model.backbone.config),
        "objective": model.objective,
        "num_labels": model.num_labels,
    }


def trainable_state(model, state_dict=None) -> dict[str, torch.Tensor]:
    """The trainable tensors by name: from the model, or picked from `state_dict` (a full state dict that
    FSDP or DeepSpeed gathered, whose own parameters are sharded)."""
    if state_dict is None:
        return {n: p.detach().contiguous().cpu() for n, p in model.trainable_named_parameters()}
    names = [n for n, _ in model.trainable_named_parameters()]
    missing = [n for n in names if n not in state_dict]
    if missing:
        raise CheckpointError(f"the state dict to save lacks trainable tensor(s) {missing[:5]}")
    return {n: state_dict[n].detach().contiguous().cpu() for n in names}


def save_adapter(model, directory, state_dict=None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(trainable_state(model, state_dict), str(tmp),
                  metadata={"format": "pt", "method": model.method_config.name})
    write_json(directory / CONFIG_NAME, adapter_config(model))
    return directory


def read_adapter_config(directory) -> dict:
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such checkpoint folder")
    if not cfg_path.exists():
        pickles = [p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        hint = f" (found pickled weights {pickles}: memtune loads safetensors only)" if pickles else ""
        raise CheckpointError(f"{directory}: missing {CONFIG_NAME}; not a memtune checkpoint{hint}")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None


def check_compatible(saved: dict, model) -> None:
    """Raise CheckpointError unless `saved` (an adapter_config) was made for this model and method."""
    here = adapter_config(model)
    if saved.get("base_fingerprint") != here["base_fingerprint"]:
        raise CheckpointError(
            f"checkpoint was made for base model {saved.get('base_model')!r} "
            f"({saved.get('base_model_type')}, fingerprint {saved.get('base_fingerprint')}), "
            f"not for {here['base_model']!r} ({here['base_model_type']}, fingerprint {here['base_fingerprint']})")
    if saved.get("method") != here["method"]:
        raise CheckpointError(f"checkpoint holds method {saved.get('method')!r}, the model was built "
                              f"for {here['method']!r}")
    if "num_labels" in saved and saved["num_labels"] != here["num_labels"]:
        def head(n):
            return "a causal-LM head" if n is None else f"a {n}-class head"
        raise CheckpointError(f"checkpoint has {head(saved['num_labels'])}, the model was built with "
                              f"{head(here['num_labels'])} (a task with other classes?)")


def load_weights(model, directory) -> None:
    """Copy the saved trainable tensors into `model`; names and shapes must match exactly."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"{directory}: missing {WEIGHTS_NAME} (memtune loads safetensors only)")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    params = dict(model.trainable_named_parameters())
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match the config: missing {missing[:5]}"
                              f"{'…' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{'…' if len(unexpected) > 5 else ''}")
    for name, t in tensors.items():
        if t.shape != params[name].shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {tuple(t.shape)}, "
                                  f"the model expects {tuple(params[name].shape)}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)

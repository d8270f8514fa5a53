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

from .atomic import atomic_path, write_json
from .models import config_fingerprint
from .version import __version__

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
        **label_maps(model),
        # seq2seq: the text each class is generated as (memtune eval and predict rebuild the targets from it).
        **({"label_words": words} if (words := getattr(model, "label_words", None)) else {}),
        # Memory techniques (gc, nf4, ...) that `memtune.load` re-applies: a quantized base is rebuilt.
        **({"techniques": t.to_dict()} if (t := getattr(model, "memory_techniques", None)) else {}),
    }


def attach_label_names(model, names) -> None:
    """Give `model` its class names as transformers does: `id2label` {0: "neg", ...}, `label2id` {"neg": 0}.
    `names=None` (a causal LM, or an adapter saved without names) leaves both None."""
    if names is None:
        model.id2label = model.label2id = None
        return
    names = [str(n) for n in names]
    if model.num_labels is not None and len(names) != model.num_labels:
        raise CheckpointError(f"{len(names)} class names {names} for a {model.num_labels}-class head")
    if len(set(names)) != len(names):
        raise CheckpointError(f"class names must be distinct, got {names}")
    model.id2label = dict(enumerate(names))
    model.label2id = {n: i for i, n in enumerate(names)}


def label_names(model) -> list[str] | None:
    """The model's class names in head order, or None when it has none."""
    id2label = getattr(model, "id2label", None)
    return [id2label[i] for i in range(len(id2label))] if id2label else None


def label_maps(model) -> dict:
    """adapter_config.json's `id2label` (string keys, as in a transformers config.json) and `label2id`."""
    names = label_names(model)
    if names is None:
        return {}
    return {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)}}


def saved_label_names(saved: dict) -> list[str] | None:
    """Class names from an adapter_config (None for adapters saved without them)."""
    id2label = saved.get("id2label")
    if not id2label:
        return None
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, TypeError, ValueError):
        raise CheckpointError(f"adapter_config.json: id2label must map class ids to names, got {id2label!r}") \
            from None
    if sorted(by_id) != list(range(len(by_id))):
        raise CheckpointError(f"adapter_config.json: id2label ids must be 0..{len(by_id) - 1}, got {sorted(by_id)}")
    return [by_id[i] for i in range(len(by_id))]


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


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes a safetensors file of these tensors takes, less its small JSON header."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def save_adapter(model, directory, state_dict=None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = trainable_state(model, state_dict)
    with atomic_path(directory / WEIGHTS_NAME, needed_bytes=tensor_bytes(tensors)) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "method": model.method_config.name})
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
            return "the LM head (no class head)" if n is None else f"a {n}-class head"
        raise CheckpointError(f"checkpoint has {head(saved['num_labels'])}, the model was built with "
                              f"{head(here['num_labels'])} (a task with other classes?)")
    saved_names, names = saved_label_names(saved), label_names(model)
    if saved_names is not None and names is not None and saved_names != names:
        raise CheckpointError(f"checkpoint's classes {saved_names} differ from the model's {names} "
                              "(a task with other class names or another label order?)")


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
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).sum().item()
            raise CheckpointError(f"{path}: tensor {name} holds {bad} NaN/inf value(s) of {t.numel()}; the adapter "
                                  "is damaged (or was saved from a diverged run): use an earlier checkpoint")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)

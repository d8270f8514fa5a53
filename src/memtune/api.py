"""The library's entry points: wrap a model with a method, load a saved adapter."""
from __future__ import annotations

from .backbones import backbone_for
from .checkpoint import CheckpointError, check_compatible, load_weights, read_adapter_config
from .methods import METHODS, MemtuneModel, MethodConfig, config_for
from .models import LoadedModel, load_model


def wrap(model, config: MethodConfig | str, *, num_labels: int | None = None, name: str | None = None) -> MemtuneModel:
    """Wrap a Hugging Face model (or a `LoadedModel`) with a method.

    >>> m = memtune.wrap(AutoModel.from_pretrained(path), memtune.LoRAConfig(r=8), num_labels=2)
    >>> out = m(input_ids=ids, attention_mask=mask, labels=y); out.loss.backward()

    `num_labels=None` on a decoder trains a causal LM through its frozen LM head.
    """
    if isinstance(model, LoadedModel):
        name = name or model.name
        model = model.model
    if isinstance(config, str):
        config = config_for(config)
    backbone = backbone_for(model)
    wrapped = config.model_class(backbone, config, num_labels)
    wrapped.base_name = name or getattr(model.config, "_name_or_path", "") or model.config.model_type
    return wrapped


def load(base_model, directory) -> MemtuneModel:
    """Rebuild a saved adapter on `base_model` (alias/path/hub id, LoadedModel or HF module)."""
    saved = read_adapter_config(directory)
    method = saved.get("method")
    if method not in METHODS:
        raise CheckpointError(f"{directory}: unknown method {method!r}; available: {', '.join(METHODS)}")
    if isinstance(base_model, str):
        base_model = load_model(base_model)
    config = METHODS[method].from_dict(saved.get("config", {}))
    model = wrap(base_model, config, num_labels=saved.get("num_labels"))
    check_compatible(saved, model)
    load_weights(model, directory)
    if getattr(model, "data_init_pending", False):
        model.data_init_pending = False  # the saved weights already hold the data-dependent initialisation
    return model

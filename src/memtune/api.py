"""The library's entry points: wrap a model with a method, load a saved adapter."""
from __future__ import annotations

from .backbones import backbone_for
from .checkpoint import (CheckpointError, attach_label_names, check_compatible, load_weights, read_adapter_config,
                         saved_label_names)
from .methods import METHODS, MemtuneModel, MethodConfig, config_for
from .models import LoadedModel, load_model
from .techniques import MemoryTechniques


def wrap(model, config: MethodConfig | str, *, num_labels: int | None = None, name: str | None = None,
         label_names: list[str] | None = None, label_words: list[str] | None = None,
         techniques=None) -> MemtuneModel:
    """Wrap a Hugging Face model (or a `LoadedModel`) with a method.

    >>> m = memtune.wrap(AutoModel.from_pretrained(path), memtune.LoRAConfig(r=8), num_labels=2)
    >>> out = m(input_ids=ids, attention_mask=mask, labels=y); out.loss.backward()

    `num_labels=None` on a decoder trains a causal LM through its frozen LM head, on an encoder-decoder (T5)
    text-to-text ("seq2seq": labels are target token ids B×Tt, the decoder reads them shifted right).
    `label_names` (one per class, in head order) become `m.id2label` / `m.label2id` and are saved with the
    adapter; for seq2seq classification `label_words` (default: the names) is the text each class is
    generated as.
    `techniques` ("nf4+gc", ("gc",), a `memtune.techniques.MemoryTechniques`) applies memory techniques
    orthogonal to the method after it is built: gc, nf4 / fp4 / int8 frozen base weights, offload, chunked_ce
    (the LM loss a chunk of tokens at a time).
    """
    if isinstance(model, LoadedModel):
        name = name or model.name
        model = model.model
    if isinstance(config, str):
        config = config_for(config)
    backbone = backbone_for(model)
    wrapped = config.model_class(backbone, config, num_labels)
    wrapped.base_name = name or getattr(model.config, "_name_or_path", "") or model.config.model_type
    seq2seq = wrapped.objective == "seq2seq"
    attach_label_names(wrapped, label_names if num_labels is not None or seq2seq else None)
    if seq2seq and (label_words or label_names):
        wrapped.label_words = [str(w) for w in (label_words or label_names)]
    elif label_words:
        raise ValueError(f"label_words are for text-to-text (seq2seq) models; this one is {wrapped.objective}")
    if techniques:
        from .techniques import apply_techniques

        apply_techniques(wrapped, techniques)
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
    # Class names (`model.id2label`) come from the adapter; adapters saved without them load with None.
    # The memory techniques it was trained with (quantized base weights, ...) are rebuilt on the base.
    model = wrap(base_model, config, num_labels=saved.get("num_labels"), label_names=saved_label_names(saved),
                 label_words=saved.get("label_words"), techniques=MemoryTechniques.for_loading(saved.get("techniques")))
    check_compatible(saved, model)
    load_weights(model, directory)
    if getattr(model, "data_init_pending", False):
        model.data_init_pending = False  # the saved weights already hold the data-dependent initialisation
    return model

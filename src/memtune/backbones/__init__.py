"""Backbone adapters by model family; `backbone_for(model)` picks one from `config.model_type`."""
from __future__ import annotations

from .base import Backbone, Context, UnsupportedModel
from .bert import BertLikeBackbone
from .llama import LlamaLikeBackbone
from .t5 import T5Backbone
from .vit import ViTLikeBackbone

FAMILIES: dict[str, type[Backbone]] = {
    "bert": BertLikeBackbone, "roberta": BertLikeBackbone, "xlm-roberta": BertLikeBackbone,
    "mpnet": BertLikeBackbone,
    "vit": ViTLikeBackbone, "dinov2": ViTLikeBackbone,
    "t5": T5Backbone,
    "llama": LlamaLikeBackbone, "mistral": LlamaLikeBackbone, "qwen2": LlamaLikeBackbone,
}


def backbone_for(model) -> Backbone:
    """Wrap a Hugging Face model (base model, or XForCausalLM for decoders) in its family's adapter."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model type {model_type!r} is not supported; supported model types: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type](model)


__all__ = ["Backbone", "Context", "UnsupportedModel", "backbone_for", "FAMILIES"]

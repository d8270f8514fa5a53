"""Backbone adapters by model family; `backbone_for(model)` picks one from `config.model_type`."""
from __future__ import annotations

from .bart import BartBackbone, MBartBackbone
from .base import Backbone, Context, UnsupportedModel
from .bert import BertLikeBackbone
from .deberta import DebertaV2Backbone
from .distilbert import DistilBertBackbone
from .gemma import GemmaBackbone
from .gpt2 import GPT2Backbone
from .gpt_neox import GPTNeoXBackbone
from .llama import LlamaLikeBackbone
from .modernbert import ModernBertBackbone
from .opt import OPTBackbone
from .phi3 import Phi3Backbone
from .swin import SwinBackbone
from .t5 import T5Backbone
from .vision_tower import CLIPVisionBackbone, SiglipVisionBackbone
from .vit import ViTLikeBackbone

FAMILIES: dict[str, type[Backbone]] = {
    "bert": BertLikeBackbone, "roberta": BertLikeBackbone, "xlm-roberta": BertLikeBackbone,
    "mpnet": BertLikeBackbone,
    "vit": ViTLikeBackbone, "dinov2": ViTLikeBackbone,
    "t5": T5Backbone,
    "bart": BartBackbone, "mbart": MBartBackbone,
    "llama": LlamaLikeBackbone, "mistral": LlamaLikeBackbone, "qwen2": LlamaLikeBackbone, "qwen3": LlamaLikeBackbone,
    "opt": OPTBackbone,
    "gpt2": GPT2Backbone,
    "gemma2": GemmaBackbone, "gemma3_text": GemmaBackbone,
    "phi3": Phi3Backbone, "gpt_neox": GPTNeoXBackbone,
    "distilbert": DistilBertBackbone,
    "deberta-v2": DebertaV2Backbone,
    "modernbert": ModernBertBackbone,
    "clip_vision_model": CLIPVisionBackbone, "siglip_vision_model": SiglipVisionBackbone,
    "swin": SwinBackbone,
}


def tiny_configs() -> dict:
    """Every family's tiny aliases → their configs, in registry order."""
    out: dict = {}
    for cls in dict.fromkeys(FAMILIES.values()):
        out.update(cls.tiny_configs())
    return out


def families_with(capabilities) -> list[str]:
    """The family names whose backbones declare every one of `capabilities`, in registry order."""
    need = set(capabilities)
    return list(dict.fromkeys(cls.family for cls in FAMILIES.values() if need <= cls.capabilities))


def family_class(config) -> type[Backbone]:
    """The backbone class of a Hugging Face config's model type, with no model built (planner facts)."""
    model_type = getattr(config, "model_type", None)
    if model_type == "image_text":          # a composition (image_text.py): its text family's composed class
        from .image_text import composed_family

        return composed_family(config)
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model type {model_type!r} is not supported; supported model types: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def backbone_for(model) -> Backbone:
    """Wrap a Hugging Face model (base model, or XForCausalLM for decoders) in its family's adapter. A composed
    model (`image_text.compose`) builds its own adapter."""
    if hasattr(model, "memtune_backbone"):
        return model.memtune_backbone()
    return family_class(getattr(model, "config", None))(model)


__all__ = ["Backbone", "Context", "UnsupportedModel", "backbone_for", "families_with", "family_class", "tiny_configs", "FAMILIES"]

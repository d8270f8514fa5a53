"""Full fine-tuning, linear probe (frozen backbone + head) and BitFit (biases only), and the model they share
with the methods that change the backbone in place (LoRA, IA3, adapters): features from its own forward."""
from __future__ import annotations

import torch

from ..base import ConfigError, MemtuneModel
from ..common.trunk_cache import cached_features, check_trunk_deterministic, trunk_eval_mode


class BackboneFeatures(MemtuneModel):
    """features = pool(Backbone.forward(batch)): B×feature_size, or B×T×d finished token states (causal LM,
    seq2seq), through whatever the method injected into or hooked onto the backbone's modules."""

    visual_prefix = True         # an image-text composition's visual tokens enter the backbone (docs/methods/vl.md §4)

    def features(self, batch):
        h, ctx = self.backbone(batch)
        return h if self.per_token else self.backbone.pool(h, ctx)


class FullModel(BackboneFeatures):
    """Every parameter trains, except an untied LM head under a classifier: nothing reads it there, so it would
    only hold optimizer state (a tied head is the embedding, which trains under its own name)."""

    def is_trainable(self, name: str) -> bool:
        return not (self.objective == "classification" and name.startswith("backbone.model.lm_head."))


class LinearProbeModel(BackboneFeatures):
    """Frozen backbone run without an autograd graph; only the head trains (the memory floor). With cache_trunk
    the pooled features (B×feature_size) of each training example are replayed after its first epoch."""

    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        if self.per_token:
            raise ConfigError(f"linear: a linear probe has nothing to train on a {self.objective} objective "
                              "(the LM head is frozen); use it with num_labels (classification)")
        if config.cache_trunk:
            check_trunk_deterministic("linear", [backbone], config.trunk_dropout)
        self.trunk_cache = config.make_trunk_cache()

    def features(self, batch):
        bb = self.backbone
        cache = self.trunk_cache if self.training else None
        with torch.no_grad(), trunk_eval_mode(bb, not self.method_config.trunk_dropout):
            return cached_features(cache, batch, batch.get("attention_mask"), bb.input_keys,
                                   lambda: BackboneFeatures.features(self, batch), self.head.weight)


class BitFitModel(BackboneFeatures):
    """Only the backbone's bias terms (and the head) train."""

    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        if not any(n.endswith("bias") for n, _ in backbone.named_parameters()):
            raise ConfigError(f"bitfit: the {backbone.family} model {backbone.config.model_type!r} has no bias "
                              "terms to train; use lora, ia3 or adapter instead")

    def is_trainable(self, name: str) -> bool:
        return not name.startswith("backbone.") or name.endswith("bias")

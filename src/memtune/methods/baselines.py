"""Full fine-tuning, linear probe (frozen backbone + head) and BitFit (biases only)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ConfigError, MemtuneModel, MethodConfig


class _BackboneFeatures(MemtuneModel):
    """Features from the unmodified pretrained computation (the backbone may hold injected layers)."""

    def features(self, batch):
        h, ctx = self.backbone(batch)
        return h if self.objective == "causal-lm" else self.backbone.pool(h, ctx)


class FullModel(_BackboneFeatures):
    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        for p in self.parameters():
            p.requires_grad_(True)


class LinearProbeModel(_BackboneFeatures):
    """Frozen backbone run without an autograd graph; only the head trains (the memory floor)."""

    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        if self.objective == "causal-lm":
            raise ConfigError("linear: a linear probe has nothing to train on a causal-LM objective "
                              "(the LM head is frozen); use it with num_labels (classification)")
        self.freeze_backbone()

    def features(self, batch):
        with torch.no_grad():
            return super().features(batch)


class BitFitModel(_BackboneFeatures):
    """Only the backbone's bias terms (and the head) train."""

    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        self.freeze_backbone()
        biases = [p for n, p in self.backbone.named_parameters() if n.endswith("bias")]
        if not biases:
            raise ConfigError(f"bitfit: the {backbone.family} model {backbone.config.model_type!r} has no bias "
                              "terms to train; use lora, ia3 or adapter instead")
        for p in biases:
            p.requires_grad_(True)


@dataclass
class FullConfig(MethodConfig):
    """Every weight trains: the memory ceiling."""
    name = "full"
    model_class = FullModel
    default_lr = 5e-5


@dataclass
class LinearConfig(MethodConfig):
    """Frozen backbone + trainable head: the memory floor."""
    name = "linear"
    model_class = LinearProbeModel
    default_lr = 2e-3


@dataclass
class BitFitConfig(MethodConfig):
    """Bias terms only (Ben Zaken et al., 2022)."""
    name = "bitfit"
    model_class = BitFitModel
    default_lr = 1e-3

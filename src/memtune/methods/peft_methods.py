"""LoRA and IA3 through the `peft` library (injected into the backbone's own modules, not rewritten)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import MethodConfig, check
from .baselines import _BackboneFeatures


def _suffix_regex(names: tuple[str, ...]) -> str:
    """peft matches a string target as a full-name regex; match modules whose names END with any of these."""
    return r".*\.(" + "|".join(n.replace(".", r"\.") for n in names) + r")$"


class PeftInjectedModel(_BackboneFeatures):
    """Backbone with peft layers injected in place; only the injected parameters and the head train."""

    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        import peft

        self.freeze_backbone()
        peft.inject_adapter_in_model(config.peft_config(backbone), backbone.model)
        prefix = config.peft_prefix
        for n, p in backbone.named_parameters():
            p.requires_grad_(prefix in n)


@dataclass
class LoRAConfig(MethodConfig):
    """Low-rank updates W + (alpha/r)·B·A on the attention projections (Hu et al., 2022)."""
    name = "lora"
    model_class = PeftInjectedModel
    peft_prefix = "lora_"
    default_lr = 5e-4
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None   # default: the family's query and value projections

    def validate(self):
        check(self.r >= 1, f"lora.r must be a positive integer, got {self.r}")
        check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")

    def peft_config(self, backbone):
        import peft

        targets = self.target_modules or backbone.lora_targets
        return peft.LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                               target_modules=_suffix_regex(tuple(targets)))


@dataclass
class IA3Config(MethodConfig):
    """Learned rescaling of keys, values and the FFN output (Liu et al., 2022)."""
    name = "ia3"
    model_class = PeftInjectedModel
    peft_prefix = "ia3_"
    default_lr = 3e-3
    target_modules: tuple[str, ...] | None = None
    feedforward_modules: tuple[str, ...] | None = None

    def peft_config(self, backbone):
        import peft

        targets = tuple(self.target_modules or backbone.ia3_targets)
        ff = tuple(self.feedforward_modules or backbone.ia3_feedforward)
        check(set(ff) <= set(targets), f"ia3.feedforward_modules {ff} must be a subset of target_modules {targets}")
        return peft.IA3Config(target_modules=_suffix_regex(targets), feedforward_modules=_suffix_regex(ff))

"""LoRA and IA3 options, and the `peft` configs they become on a backbone."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig, check


def _suffix_regex(names: tuple[str, ...]) -> str:
    """peft matches a string target as a full-name regex; match modules whose names END with any of these."""
    return r".*\.(" + "|".join(n.replace(".", r"\.") for n in names) + r")$"


@dataclass
class LoRAConfig(MethodConfig):
    """Low-rank updates W + (alpha/r)·B·A on the attention projections (Hu et al., 2022)."""
    name = "lora"
    default_lr = 5e-4
    r: int = 8                                      # rank of B·A
    alpha: float = 16.0                             # the update is scaled by alpha / r
    dropout: float = 0.0                            # dropout on the LoRA branch's input
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
    default_lr = 3e-3
    target_modules: tuple[str, ...] | None = None        # default: the family's keys, values and FFN output
    feedforward_modules: tuple[str, ...] | None = None   # targets scaled on their input; default: the FFN output

    def peft_config(self, backbone):
        import peft

        targets = tuple(self.target_modules or backbone.ia3_targets)
        ff = tuple(self.feedforward_modules or backbone.ia3_feedforward)
        check(set(ff) <= set(targets), f"ia3.feedforward_modules {ff} must be a subset of target_modules {targets}")
        return peft.IA3Config(target_modules=_suffix_regex(targets), feedforward_modules=_suffix_regex(ff))

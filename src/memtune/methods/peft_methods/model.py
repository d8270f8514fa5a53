"""The backbone with `peft` layers injected into its own modules (not rewritten): LoRA and IA3."""
from __future__ import annotations

from ..baselines.model import BackboneFeatures


class PeftInjectedModel(BackboneFeatures):
    """Backbone with peft layers injected in place; only the injected parameters and the head train."""

    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        import peft
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

        peft_config = config.peft_config(backbone)
        peft.inject_adapter_in_model(peft_config, backbone.model)
        # peft names the modules that hold its parameters with its tuner's prefix: lora_A, lora_B, ia3_l, ...
        self.peft_prefix: str = PEFT_TYPE_TO_TUNER_MAPPING[peft_config.peft_type].prefix

    def is_trainable(self, name: str) -> bool:
        """Outside the backbone, and the backbone tensors inside a module whose name carries peft's prefix."""
        return not name.startswith("backbone.") or any(part.startswith(self.peft_prefix) for part in name.split("."))

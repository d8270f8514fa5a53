"""LoRA and IA3 through the `peft` library."""
from .config import IA3Config, LoRAConfig
from .model import PeftInjectedModel

LoRAConfig.model_class = PeftInjectedModel
IA3Config.model_class = PeftInjectedModel

CONFIGS = [LoRAConfig, IA3Config]

__all__ = ["CONFIGS", "IA3Config", "LoRAConfig", "PeftInjectedModel"]

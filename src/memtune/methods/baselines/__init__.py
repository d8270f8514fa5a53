"""The baselines every memory-efficient method is compared with: full fine-tuning, linear probe, BitFit."""
from .config import BitFitConfig, FullConfig, LinearConfig
from .model import BackboneFeatures, BitFitModel, FullModel, LinearProbeModel

FullConfig.model_class = FullModel
LinearConfig.model_class = LinearProbeModel
BitFitConfig.model_class = BitFitModel

CONFIGS = [FullConfig, LinearConfig, BitFitConfig]

__all__ = ["CONFIGS", "BackboneFeatures", "BitFitConfig", "BitFitModel", "FullConfig", "FullModel", "LinearConfig",
           "LinearProbeModel"]

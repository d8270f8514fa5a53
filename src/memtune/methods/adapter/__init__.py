"""Bottleneck adapters (Houlsby et al., 2019), hooked after the backbone's sub-layer output projections."""
from .config import AdapterConfig
from .model import AdapterModel, Bottleneck

AdapterConfig.model_class = AdapterModel

CONFIGS = [AdapterConfig]

__all__ = ["CONFIGS", "AdapterConfig", "AdapterModel", "Bottleneck"]

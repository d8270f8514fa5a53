"""Quantized Side Tuning (QST): config, side network, downsample modules and model."""
from .config import QSTConfig
from .model import QSTModel

QSTConfig.model_class = QSTModel

CONFIGS = [QSTConfig]

__all__ = ["QSTConfig", "QSTModel", "CONFIGS"]

"""Ladder Side-Tuning (LST): config, model, pruned-weight initialisation and T5 generation."""
from .config import LSTConfig
from .model import LSTModel

LSTConfig.model_class = LSTModel

CONFIGS = [LSTConfig]

__all__ = ["LSTConfig", "LSTModel", "CONFIGS"]

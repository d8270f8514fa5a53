from .base import ConfigError, MemtuneModel, MethodConfig
from .registry import METHODS, config_for

__all__ = ["METHODS", "ConfigError", "MemtuneModel", "MethodConfig", "config_for"]

"""memtune: fine-tune pretrained transformers within a memory budget."""
from .version import __version__  # noqa: F401

from .api import load, wrap  # noqa: E402
from .methods import METHODS, ConfigError, MemtuneModel, MethodConfig  # noqa: E402
from .methods.registry import config_for  # noqa: E402
from .models import load_model  # noqa: E402


def __getattr__(name):
    """`memtune.LoRAConfig` etc.: every registered config class by its class name; `memtune.MemtuneTrainer`
    (imported on first use: it pulls in transformers' Trainer)."""
    if name == "MemtuneTrainer":
        from .hf_trainer import MemtuneTrainer

        return MemtuneTrainer
    for cls in METHODS.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(name)


__all__ = ["wrap", "load", "load_model", "METHODS", "config_for", "ConfigError", "MemtuneModel", "MethodConfig"]

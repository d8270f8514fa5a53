"""Method names → config classes. A method file registers itself by being listed here."""
from __future__ import annotations

from .adapter import AdapterConfig
from .base import ConfigError, MethodConfig
from .baselines import BitFitConfig, FullConfig, LinearConfig
from .peft_methods import IA3Config, LoRAConfig

METHODS: dict[str, type[MethodConfig]] = {}


def register(*configs: type[MethodConfig]) -> None:
    for c in configs:
        METHODS[c.name] = c


register(FullConfig, LinearConfig, BitFitConfig, LoRAConfig, IA3Config, AdapterConfig)


def _register_side_methods() -> None:
    """Import the memory-efficient methods; each file lists its config classes in `CONFIGS`."""
    import importlib

    for mod in ("lst", "dtl", "sherl", "meft", "qst"):
        try:
            module = importlib.import_module(f"{__package__}.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.{mod}":
                raise
            continue
        register(*module.CONFIGS)


_register_side_methods()


def config_for(method: str, options: dict | None = None) -> MethodConfig:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    return METHODS[method].from_dict(options or {})

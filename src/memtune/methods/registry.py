"""Method names → config classes: every method package, imported and registered here once."""
from __future__ import annotations

from . import adapter, baselines, dtl, lst, meft, peft_methods, qst, sherl
from .base import ConfigError, MethodConfig

METHODS: dict[str, type[MethodConfig]] = {}


def register(*configs: type[MethodConfig]) -> None:
    """Add configs under their `name`; a name registered twice, or a config bound to no model, raises."""
    for c in configs:
        if c.name in METHODS:
            raise ValueError(f"method name {c.name!r} is registered twice: by {METHODS[c.name].__qualname__} "
                             f"and by {c.__qualname__}")
        if getattr(c, "model_class", None) is None:
            raise TypeError(f"{c.__qualname__} has no model_class: bind it in its method package's __init__.py")
        METHODS[c.name] = c


register(*baselines.CONFIGS, *peft_methods.CONFIGS, *adapter.CONFIGS, *lst.CONFIGS, *dtl.CONFIGS, *sherl.CONFIGS,
         *meft.CONFIGS, *qst.CONFIGS)


def config_for(method: str, options: dict | None = None) -> MethodConfig:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    return METHODS[method].from_dict(options or {})

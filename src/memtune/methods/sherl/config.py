"""SHERL options (Diao et al., "SHERL", ECCV 2024)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..base import MethodConfig, check
from ..common.compact_linear import TAP_STORAGES
from ..common.trunk_cache import TrunkCacheOptions

PROJECTIONS = ("auto", "gated", "linear-ln")
RESTORES = ("linear", "linear-ln")


@dataclass
class SHERLConfig(TrunkCacheOptions, MethodConfig):
    """SHERL (Diao et al., ECCV 2024): frozen early layers without a graph, a multi-tiered sensing adapter
    over their outputs, and the last pretrained layer(s) as a frozen late route.

    tap_storage: how each projection P_l keeps its frozen input F_l for the weight gradient ("full", "bf16",
    "int8"; methods/common/compact_linear.py). trunk_dropout: the early route runs in the module's train
    mode (default, as the paper); false runs it in eval mode, deterministic, as cache_trunk needs on a
    backbone with dropout. cache_*: the trunk cache of the early route (methods/common/trunk_cache.py;
    bert, vit, llama)."""
    name = "sherl"
    default_lr = 5e-4
    r: int = 4                          # side width d = hidden_size // r
    late_layers: int = 1                # frozen blocks at the end that gradient flows through
    gate_init: float = 0.0              # γ at init; tanh(0) = 0 keeps the gate closed (the paper's start)
    temperature: float = 0.1            # τ in tanh(γ/τ)
    projection: str = "auto"            # P_l: "gated" | "linear-ln" | "auto" (gated on encoder-decoders, e.g.
                                        # T5, as the released T5 code; else linear-ln)
    restore: str = "linear"             # U: "linear" | "linear-ln"
    drop_every: Optional[int] = None    # skip outputs of blocks i % k == 0; None: 4 on encoder-decoders (the
                                        # released T5 config), 0 (keep all) else
    tap_storage: str = "full"           # saved F_l of each P_l: "full" | "bf16" | "int8"
    trunk_dropout: bool = True          # early route in the module's train mode (false: eval mode)

    def validate(self):
        check(self.r >= 1, f"sherl.r must be a positive integer (side width = hidden_size // r), got {self.r}")
        check(self.late_layers >= 1, f"sherl.late_layers must be >= 1, got {self.late_layers}")
        check(self.temperature > 0, f"sherl.temperature must be > 0, got {self.temperature}")
        check(self.projection in PROJECTIONS,
              f"sherl.projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        check(self.restore in RESTORES, f"sherl.restore must be one of {', '.join(RESTORES)}, got {self.restore!r}")
        check(self.drop_every is None or self.drop_every >= 0,
              f"sherl.drop_every must be None or >= 0 (0 keeps every layer), got {self.drop_every}")
        check(self.tap_storage in TAP_STORAGES,
              f"sherl.tap_storage must be one of {', '.join(TAP_STORAGES)}, got {self.tap_storage!r}")
        self.validate_trunk_cache()

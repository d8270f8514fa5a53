"""Options of the baselines: full fine-tuning, linear probe (its trunk cache), BitFit."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig
from ..common.trunk_cache import TrunkCacheOptions


@dataclass
class FullConfig(MethodConfig):
    """Every weight trains: the memory ceiling."""
    name = "full"
    default_lr = 5e-5


@dataclass
class LinearConfig(TrunkCacheOptions, MethodConfig):
    """Frozen backbone + trainable head: the memory floor.

    trunk_dropout  run the frozen backbone in the module's train mode, with its dropout (default true, the
                 plain probe); false: in eval mode, deterministic features (what cache_trunk needs on a backbone
                 with dropout).
    cache_*      the trunk cache (`methods/common/trunk_cache.py`): each training example's pooled features are
                 computed once and replayed in later epochs (one row of feature_size values per example), verified
                 by an input checksum on every hit; many epochs of a probe then cost about one.
    """
    name = "linear"
    default_lr = 2e-3
    trunk_dropout: bool = True

    def validate(self):
        self.validate_trunk_cache()


@dataclass
class BitFitConfig(MethodConfig):
    """Bias terms only (Ben Zaken et al., 2022)."""
    name = "bitfit"
    default_lr = 1e-3

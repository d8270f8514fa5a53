"""Options of the baselines: full fine-tuning, linear probe, BitFit (none of them has options of its own)."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig


@dataclass
class FullConfig(MethodConfig):
    """Every weight trains: the memory ceiling."""
    name = "full"
    default_lr = 5e-5


@dataclass
class LinearConfig(MethodConfig):
    """Frozen backbone + trainable head: the memory floor."""
    name = "linear"
    default_lr = 2e-3


@dataclass
class BitFitConfig(MethodConfig):
    """Bias terms only (Ben Zaken et al., 2022)."""
    name = "bitfit"
    default_lr = 1e-3

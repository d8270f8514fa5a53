"""Options of the bottleneck adapters (Houlsby et al., 2019)."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig, check


@dataclass
class AdapterConfig(MethodConfig):
    """Bottleneck adapters of width d/reduction after attention and FFN outputs (Houlsby et al., 2019)."""
    name = "adapter"
    reduction: int = 16                 # bottleneck width = max(1, hidden_size // reduction)

    def validate(self):
        check(self.reduction >= 1, f"adapter.reduction must be a positive integer, got {self.reduction}")

"""The options every side-network method (LST, QST) has: the side blocks' attention kernel, its probability
dropout and head count, how the frozen taps are kept for backward, and whether the frozen trunk runs with its
dropout. Each method documents what they mean for it in its own config docstring.

A config lists these after its own fields (the order `memtune train --help` and adapter_config.json show),
so its own fields sit in a dataclass of their own that comes after this mixin in the bases:

    @dataclass
    class XConfig(SideNetworkOptions, XFields, TrunkCacheOptions, MethodConfig): ...
"""
from __future__ import annotations

from dataclasses import dataclass

from ..base import check
from .compact_linear import TAP_STORAGES

ATTENTIONS = ("auto", "eager", "sdpa")


@dataclass
class SideNetworkOptions:
    """Mixin for a method config: the shared side-network options and their checks."""
    attention: str = "auto"
    attention_dropout: float | None = None
    side_heads: int | None = None
    tap_storage: str = "full"
    trunk_dropout: bool = True

    def validate_side_options(self) -> None:
        n = self.name
        check(self.attention in ATTENTIONS,
              f"{n}.attention must be one of {', '.join(ATTENTIONS)}; got {self.attention!r}")
        check(self.attention_dropout is None or 0 <= self.attention_dropout < 1,
              f"{n}.attention_dropout must be none or in [0, 1), got {self.attention_dropout}")
        check(self.side_heads is None or self.side_heads >= 1,
              f"{n}.side_heads must be a positive head count (or none for the backbone's), got {self.side_heads}")
        check(self.tap_storage in TAP_STORAGES,
              f"{n}.tap_storage must be one of {', '.join(TAP_STORAGES)}; got {self.tap_storage!r}")

    # -- against a backbone ----------------------------------------------------------------------------------
    def side_kernel(self, backbone) -> str:
        """The side blocks' attention kernel with "auto" resolved: sdpa where the block class has a fused path."""
        if self.attention != "auto":
            return self.attention
        return "sdpa" if backbone.fused_side_attention else "eager"

    def side_attention_dropout(self, kernel: str, eager: float | None) -> float | None:
        """The side attention-probability dropout with None resolved: 0 for the fused kernel (a dropout > 0 makes
        PyTorch fall back to the map-storing math kernel), `eager` for the eager one."""
        if self.attention_dropout is not None:
            return self.attention_dropout
        return 0.0 if kernel == "sdpa" else eager

    def check_side_heads(self, backbone, exact: bool) -> None:
        """ConfigError when side_heads asks for another head count than the backbone's and its side blocks
        cannot take one (exact: QST's exact side widths; LST's are rounded and its init prunes per head)."""
        heads = backbone.config.num_attention_heads
        if self.side_heads is not None and self.side_heads != heads:
            check(backbone.supports_side_heads,
                  f"{self.name}.side_heads={self.side_heads}: another head count than the backbone's ({heads}) is "
                  f"not supported for {backbone.config.model_type} backbones, whose side blocks keep the "
                  f"backbone's heads; leave side_heads unset (none)")
            check(exact or backbone.side_heads_when_rounded,
                  f"{self.name}.side_heads={self.side_heads}: on {backbone.config.model_type} backbones only QST's "
                  f"side blocks take another head count than the backbone's ({heads}); {self.name}'s pruned "
                  f"initialisation maps backbone heads to side heads one to one; leave side_heads unset (none)")

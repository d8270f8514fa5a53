"""DTL / DTL+ options (Fu et al., "DTL: Disentangled Transfer Learning for Visual Recognition", AAAI 2024)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..base import MethodConfig, check
from ..common.compact_linear import TAP_STORAGES
from ..common.trunk_cache import TrunkCacheOptions

FUSIONS = ("dwconv",)
READOUTS = ("patch-mean", "backbone")


@dataclass
class DTLConfig(TrunkCacheOptions, MethodConfig):
    """Compact Side Network: rank-r reads of block inputs, accumulated and added back (θ_β) to later outputs.

    rank         r of each read (A_i: r×D, B_i: D×r, B zero-initialised).
    read_blocks  L, the blocks whose INPUT is read. Default: every block up to the last add-back
                 (all blocks with the default add_blocks; ViT-B: 0..11). Backbones with stages (Swin): from
                 the start of each stage that has add-backs to its last add-back (Swin-B: 4..23, as the
                 reference), since the side state restarts at every stage.
    add_blocks   S, the blocks whose OUTPUT receives θ_β(h). Default: ⌊7N/12⌋−1 .. N−1 (ViT-B: 6..11, as the
                 reference code; MiniLM, 6 blocks: 2..5; Swin-B, 24 blocks: 13..23, where the reference's
                 scripts use 14..23: list those in add_blocks to match them). s₀ = min S: blocks 0..s₀ run without a
                 graph.
    beta         Swish temperature β (θ_β(u) = u·σ(βu)); 100 in every reference script.
    fusion       None (DTL) or "dwconv" (DTL+): one depthwise conv over the injection, shared by every add-back.
                 ViT-like: Conv2d k×k over the patch grid (CLS passes through); BERT-like: Conv1d of width k
                 over the token axis, padded positions zeroed (so it adds D·k parameters there, not D·k²);
                 Swin: one Conv2d per stage with add-backs, over that stage's grid (Σ C_stage·k²).
    kernel       k of the depthwise conv (3, 4 or 5 in the paper; even k pads the extra cell right/bottom).
    trunk_dropout  run the frozen trunk (embedding, blocks 0..s₀) in the module's train mode, i.e. with dropout
                 / DropPath as the reference code does. Default false: the trunk always runs in eval mode, which
                 keeps it deterministic (required by cache_trunk).
    tap_storage  how the reads A_i of trunk blocks (i ≤ s₀, frozen inputs) keep their input for the weight
                 gradient: "full", "bf16" or "int8" (see `methods/common/compact_linear.py`).
    readout      the features the head reads. "patch-mean" (default, the reference's): on one-stage patch
                 grids (ViT-like) the final LayerNorm of the mean patch token (B×D, CLS unused); elsewhere the
                 backbone's own pooling. "backbone": the backbone's own pooling everywhere (ViT/DINOv2: [CLS ‖
                 mean], 2D), the read-out of the linear probe, full fine-tuning and LoRA, for like-for-like
                 comparisons.
    cache_*      the trunk cache (`methods/common/trunk_cache.py`): cache_trunk replays the trunk's outputs
                 after the first epoch from host memory (or cache_dir), verified by an input checksum on every
                 hit. Bit-identical to not caching with cache_dtype=full.
    """
    name = "dtl"
    requires = ("encoder",)
    rank: int = 2
    read_blocks: tuple[int, ...] | None = None
    add_blocks: tuple[int, ...] | None = None
    beta: float = 100.0
    fusion: str | None = None
    kernel: int = 3
    trunk_dropout: bool = False
    tap_storage: str = "full"
    readout: str = "patch-mean"

    def validate(self):
        n = self.name
        check(self.rank >= 1, f"{n}.rank must be a positive integer, got {self.rank}")
        check(math.isfinite(self.beta) and self.beta > 0, f"{n}.beta must be a finite number > 0, got {self.beta}")
        if isinstance(self.fusion, str) and self.fusion.lower() in ("none", ""):
            self.fusion = None
        check(self.fusion is None or self.fusion in FUSIONS,
              f"{n}.fusion must be none (DTL) or one of {', '.join(FUSIONS)} (DTL+), got {self.fusion!r}")
        check(self.kernel >= 1, f"{n}.kernel (depthwise conv size) must be an integer >= 1, got {self.kernel}")
        for field in ("read_blocks", "add_blocks"):
            blocks = getattr(self, field)
            if blocks is None:
                continue
            check(len(blocks) > 0, f"{n}.{field} must list at least one block index (or be none for the default)")
            check(all(b >= 0 for b in blocks), f"{n}.{field} must be block indices >= 0, got {list(blocks)}")
            check(len(set(blocks)) == len(blocks), f"{n}.{field} repeats a block index: {list(blocks)}")
        check(self.readout in READOUTS, f"{n}.readout must be one of {', '.join(READOUTS)}, got {self.readout!r}")
        check(self.tap_storage in TAP_STORAGES,
              f"{n}.tap_storage must be one of {', '.join(TAP_STORAGES)}, got {self.tap_storage!r}")
        self.validate_trunk_cache()
        check(not (self.cache_trunk and self.trunk_dropout),
              f"{n}: cache_trunk needs a deterministic trunk, so it cannot be combined with trunk_dropout=true")


@dataclass
class DTLPlusConfig(DTLConfig):
    """DTL+: DTL with the depthwise-conv fusion of the injection (fusion="dwconv", kernel 3 by default)."""
    name = "dtl+"
    fusion: str | None = "dwconv"


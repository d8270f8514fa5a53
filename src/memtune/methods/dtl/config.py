"""DTL / DTL+ options (Fu et al., "DTL: Disentangled Transfer Learning for Visual Recognition", AAAI 2024)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..base import ConfigError, MethodConfig, check
from .model import DTLModel

FUSIONS = ("dwconv",)


@dataclass
class DTLConfig(MethodConfig):
    """Compact Side Network: rank-r reads of block inputs, accumulated and added back (θ_β) to later outputs.

    rank         r of each read (A_i: r×D, B_i: D×r, B zero-initialised).
    read_blocks  L, the blocks whose INPUT is read. Default: every block up to the last add-back
                 (all blocks with the default add_blocks; ViT-B: 0..11).
    add_blocks   S, the blocks whose OUTPUT receives θ_β(h). Default: ⌊7N/12⌋−1 .. N−1 (ViT-B: 6..11, as the
                 reference code; MiniLM, 6 blocks: 2..5). s₀ = min S: blocks 0..s₀ run without a graph.
    beta         Swish temperature β (θ_β(u) = u·σ(βu)); 100 in every reference script.
    fusion       None (DTL) or "dwconv" (DTL+): one depthwise conv over the injection, shared by every add-back.
                 ViT-like: Conv2d k×k over the patch grid (CLS passes through); BERT-like: Conv1d of width k
                 over the token axis, padded positions zeroed (so it adds D·k parameters there, not D·k²).
    kernel       k of the depthwise conv (3, 4 or 5 in the paper; even k pads the extra cell right/bottom).
    trunk_dropout  run the frozen trunk (embedding, blocks 0..s₀) in the module's train mode, i.e. with dropout
                 / DropPath as the reference code does. Default false: the trunk always runs in eval mode, which
                 keeps it deterministic (required by cache_trunk).
    cache_trunk  replay the trunk's outputs from a `TrunkCache` after the first epoch (training mode only;
                 needs batch["example_id"], and inputs that are not augmented). Bit-identical to not caching.
    cache_dir    store the cache in a memory-mapped file in this folder instead of in memory.
    cache_device where the in-memory cache lives: none = the device the trunk runs on (GPU memory on a GPU:
                 replaying from host memory is slower there than recomputing a small trunk), or e.g. "cpu".
    cache_max_bytes  the most bytes the cache may hold; going over raises a clear error.
    """
    name = "dtl"
    model_class = DTLModel
    families = ("bert", "vit")
    rank: int = 2
    read_blocks: tuple[int, ...] | None = None
    add_blocks: tuple[int, ...] | None = None
    beta: float = 100.0
    fusion: str | None = None
    kernel: int = 3
    trunk_dropout: bool = False
    cache_trunk: bool = False
    cache_dir: str | None = None
    cache_device: str | None = None
    cache_max_bytes: int = 4 * 2**30

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
        check(self.cache_max_bytes >= 1, f"{n}.cache_max_bytes must be a positive number of bytes, "
                                         f"got {self.cache_max_bytes}")
        check(not (self.cache_trunk and self.trunk_dropout),
              f"{n}: cache_trunk needs a deterministic trunk, so it cannot be combined with trunk_dropout=true")
        check(self.cache_dir is None or self.cache_trunk,
              f"{n}.cache_dir={self.cache_dir!r} is only used with cache_trunk=true")
        check(self.cache_device is None or self.cache_trunk,
              f"{n}.cache_device={self.cache_device!r} is only used with cache_trunk=true")
        check(self.cache_device is None or self.cache_dir is None,
              f"{n}: cache_dir keeps the cache on disk, so cache_device={self.cache_device!r} cannot apply; give one")
        if self.cache_device is not None:
            try:
                torch.device(self.cache_device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"{n}.cache_device must be a torch device such as cpu or cuda:0, "
                                  f"got {self.cache_device!r}") from None


@dataclass
class DTLPlusConfig(DTLConfig):
    """DTL+: DTL with the depthwise-conv fusion of the injection (fusion="dwconv", kernel 3 by default)."""
    name = "dtl+"
    fusion: str | None = "dwconv"


CONFIGS = [DTLConfig, DTLPlusConfig]

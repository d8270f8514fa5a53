"""DTL's trunk cache is the shared one (`memtune.methods.common.trunk_cache`); this name is kept for imports.

What DTL stores per example: the tap inputs x_i of the read blocks 1 ≤ i ≤ s₀ and the output of block s₀
before its injection (x_0 is the embedding output, recomputed cheaply since the embedding also yields the
attention context).
"""
from ..common.trunk_cache import TrunkCache, TrunkCacheError

__all__ = ["TrunkCache", "TrunkCacheError"]

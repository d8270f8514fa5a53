"""Pieces shared by the side methods (LST, SHERL, DTL and others that read a frozen trunk).

- `compact_linear`: a linear map over a frozen input that keeps its saved input in bf16 or int8.
- `trunk_cache`: the frozen trunk's per-example outputs, computed once and replayed in later epochs.
"""
from .compact_linear import TAP_STORAGES, TapLinear, compact_bytes, frozen_input_linear
from .trunk_cache import (CACHE_DTYPES, CACHE_VERIFY, TrunkCache, TrunkCacheError, TrunkCacheOptions,
                          cached_trunk, check_trunk_deterministic, input_checksums,
                          trunk_eval_mode)

__all__ = ["TAP_STORAGES", "TapLinear", "compact_bytes", "frozen_input_linear", "CACHE_DTYPES", "CACHE_VERIFY",
           "TrunkCache", "TrunkCacheError", "TrunkCacheOptions", "cached_trunk", "check_trunk_deterministic",
           "input_checksums", "trunk_eval_mode"]

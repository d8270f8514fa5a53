"""DTL and DTL+ (Compact Side Network): see `model.py` for the forward pass and the choices it makes."""
from .cache import TrunkCache, TrunkCacheError
from .config import CONFIGS, DTLConfig, DTLPlusConfig
from .model import DTLModel, default_add_blocks
from .side import Injection, LowRankRead, swish

__all__ = ["CONFIGS", "DTLConfig", "DTLPlusConfig", "DTLModel", "TrunkCache", "TrunkCacheError",
           "Injection", "LowRankRead", "default_add_blocks", "swish"]

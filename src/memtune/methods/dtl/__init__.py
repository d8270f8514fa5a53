"""DTL and DTL+ (Compact Side Network): see `model.py` for the forward pass and the choices it makes."""
from .cache import TrunkCache, TrunkCacheError
from .config import DTLConfig, DTLPlusConfig
from .model import DTLModel, default_add_blocks
from .side import Injection, LowRankRead, swish

DTLConfig.model_class = DTLModel                # DTLPlusConfig inherits it

CONFIGS = [DTLConfig, DTLPlusConfig]

__all__ = ["CONFIGS", "DTLConfig", "DTLPlusConfig", "DTLModel", "TrunkCache", "TrunkCacheError",
           "Injection", "LowRankRead", "default_add_blocks", "swish"]

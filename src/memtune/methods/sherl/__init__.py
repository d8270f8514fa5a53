"""SHERL (Diao et al., ECCV 2024): `model.py` wires the early and late routes, `mtsa.py` is the aggregator."""
from .config import SHERLConfig
from .model import SHERLModel, collected_blocks
from .mtsa import MTSA, layer_weights, mtsa_param_count, redundancy

SHERLConfig.model_class = SHERLModel

CONFIGS = [SHERLConfig]

__all__ = ["CONFIGS", "MTSA", "SHERLConfig", "SHERLModel", "collected_blocks", "layer_weights", "mtsa_param_count",
           "redundancy"]

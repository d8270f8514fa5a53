"""SHERL (Diao et al., ECCV 2024): `model.py` wires the early and late routes, `mtsa.py` is the aggregator;
`retrieval.py` is the two-tower retrieval form over an image-text composition (config `form="retrieval"`)."""
from .config import SHERLConfig
from .model import SHERLModel, collected_blocks
from .mtsa import MTSA, layer_weights, mtsa_param_count, redundancy
from .retrieval import SHERLRetrievalModel

# SHERLConfig.model_class is the model of the config's form (config._FormModel).
SHERLConfig.form_models = {"fused": SHERLModel, "retrieval": SHERLRetrievalModel}

CONFIGS = [SHERLConfig]

__all__ = ["CONFIGS", "MTSA", "SHERLConfig", "SHERLModel", "SHERLRetrievalModel", "collected_blocks",
           "layer_weights", "mtsa_param_count", "redundancy"]

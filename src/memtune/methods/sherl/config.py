"""SHERL options (Diao et al., "SHERL", ECCV 2024)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ..base import ConfigError, MethodConfig, check
from ..common.compact_linear import TAP_STORAGES
from ..common.trunk_cache import TrunkCacheOptions
from .retrieval_options import RetrievalOptions

FORMS = ("fused", "retrieval")
PROJECTIONS = ("auto", "gated", "linear-ln")
RESTORES = ("linear", "linear-ln")
INITS = ("pytorch", "normal-0.01", "normal-0.02", "xavier")

# The released forks' recipes (docs/methods/sherl.md §2, §3, §7), named after the fork; `recipe="auto"` takes
# the one whose backbone is of the same kind.
RECIPES = {
    # LST-T5 fork (GLUE): gated P_l, Linear U, weights N(0, 0.01²) and zero biases, d = D/4 (the committed
    # task_reduction_factor), outputs of blocks i % 4 == 0 skipped, lr 3e-3.
    "t5": dict(r=4, projection="gated", restore="linear", init="normal-0.01", drop_every=4, lr=3e-3),
    # VSE∞ text fork (BERT-base): Linear → LN P_l, Linear → LN → Dropout(0.1) U, PyTorch's default init,
    # d = embed_size/2 (D/2 here), every output collected, lr 5e-4.
    "vse-text": dict(r=2, projection="linear-ln", restore="linear-ln", init="pytorch", drop_every=0, lr=5e-4),
    # CLIP-ViL fork (a 12-layer transformer over grid features): gated P_l, Linear U, N(0, 0.02²), d = D/2,
    # every output collected, lr 5e-4. Also the auto recipe of Swin (a grid encoder): the released VSE∞ image
    # fork, the one that ran on a hierarchical backbone, is a retrieval recipe with a CNN's conv/BN modules;
    # what memtune takes from it is its per-stage pooling and projection (stages.py), while P_l, U, init and
    # d = D_g/2 (D_g: the guide's width) come from this, the vision-classification fork.
    "clip-vil": dict(r=2, projection="gated", restore="linear", init="normal-0.02", drop_every=0, lr=5e-4),
}


def auto_recipe(is_encoder_decoder: bool, token_layout: str) -> str:
    """The fork of the same kind: T5 for encoder–decoders, CLIP-ViL for patch-grid (vision) encoders, VSE∞'s
    BERT text tower for text encoders and for decoders (no fork ran on a decoder)."""
    return "t5" if is_encoder_decoder else "clip-vil" if token_layout == "grid" else "vse-text"


class _FormModel:
    """`SHERLConfig.model_class`: the model of the config's form (bound in the package's __init__.py, so that this
    file holds data only). Read off the class (the registry, the support checks) it is the fused form's."""

    def __get__(self, config, cls):
        return cls.form_models["fused" if config is None else config.form]


@dataclass
class SHERLConfig(RetrievalOptions, TrunkCacheOptions, MethodConfig):
    """SHERL (Diao et al., ECCV 2024): frozen early layers without a graph, a multi-tiered sensing adapter
    over their outputs, and the last pretrained layer(s) as a frozen late route.

    recipe: "auto" (default), "t5", "vse-text" or "clip-vil": the released fork whose side width, P_l, U, init,
    collected layers and learning rate the options left at None take (RECIPES above; auto: t5 on encoder–
    decoders, clip-vil on vision encoders, vse-text on text encoders and decoders). r, projection, restore,
    init and drop_every given explicitly override the recipe. The default learning rate follows the family's
    auto recipe.
    init: how the MTSA's linear maps start: "pytorch" (PyTorch's default), "normal-0.01" / "normal-0.02"
    (N(0, σ²) weights, zero biases), "xavier" (Xavier-uniform weights, zero biases); the relevance bias b_a
    starts at 1 whatever the init (mtsa.py says why).
    tap_storage: how each projection P_l keeps its frozen input F_l for the weight gradient ("full", "bf16",
    "int8"; methods/common/compact_linear.py). trunk_dropout: the early route runs in the module's train
    mode (default, as the paper); false runs it in eval mode, deterministic, as cache_trunk needs on a
    backbone with dropout. cache_*: the trunk cache of the early route (methods/common/trunk_cache.py;
    bert, vit, llama; refused on hierarchical backbones such as Swin, whose features differ per stage).
    On Swin the early outputs are pooled and projected to the guide's grid and width (stages.py) and
    late_layers is at most the depth of the last stage.

    form  "fused" (default: one stack and a head) or "retrieval" (an image-text composition as two towers, each
          with its own MTSA and late layer, joined only by the cosine similarity of their embeddings;
          retrieval.py, options in retrieval_options.py)"""
    name = "sherl"
    # The MTSA mixes the early outputs at one width: the backbone has one ("one_width"), or it declares its
    # stages ("stages", Swin), whose outputs are pooled and projected to the guide's grid and width. A
    # disjunction, which `requires` (a conjunction) cannot state: see supported_families / check_family.
    requires = ()
    requires_one_of: ClassVar[tuple[str, ...]] = ("one_width", "stages")
    default_lr = 5e-4
    model_class = _FormModel()
    form_models: ClassVar[dict] = {}    # form → model class, bound in __init__.py
    form: str = "fused"                 # FORMS: one fused stack, or two towers for retrieval
    recipe: str = "auto"                # the released fork to follow (RECIPES)
    r: Optional[int] = None             # side width d = hidden_size // r (None: the recipe's)
    late_layers: int = 1                # frozen blocks at the end that gradient flows through
    gate_init: float = 0.0              # γ at init; tanh(0) = 0 keeps the gate closed (the paper's start)
    temperature: float = 0.1            # τ in tanh(γ/τ)
    projection: str = "auto"            # P_l: "gated" | "linear-ln" | "auto" (the recipe's)
    restore: Optional[str] = None       # U: "linear" | "linear-ln" (None: the recipe's)
    init: Optional[str] = None          # INITS (None: the recipe's)
    drop_every: Optional[int] = None    # skip outputs of blocks i % k == 0; 0 keeps all (None: the recipe's)
    tap_storage: str = "full"           # saved F_l of each P_l: "full" | "bf16" | "int8"
    trunk_dropout: bool = True          # early route in the module's train mode (false: eval mode)

    @classmethod
    def lr_for(cls, family: str) -> float:
        """The learning rate of the family's auto recipe (T5: 3e-3, the others 5e-4)."""
        from ...backbones import FAMILIES

        bb = next(c for c in FAMILIES.values() if c.family == family)
        return RECIPES[auto_recipe(bb.is_encoder_decoder, bb.token_layout)]["lr"]

    @classmethod
    def supported_families(cls) -> list[str]:
        """Families with one width or declared stages (`requires_one_of`), in registry order."""
        from ...backbones import FAMILIES

        return list(dict.fromkeys(c.family for c in FAMILIES.values() if set(cls.requires_one_of) & c.capabilities))

    def check_family(self, backbone) -> None:
        super().check_family(backbone)
        if not set(self.requires_one_of) & backbone.capabilities:
            raise ConfigError(f"method {self.name!r} does not support the {backbone.family} family (it needs one of "
                              f"the capabilities {', '.join(map(repr, self.requires_one_of))}); "
                              f"supported families: {', '.join(self.supported_families())}")

    def resolved(self, backbone) -> dict:
        """r, projection, restore, init, drop_every for `backbone`: the explicit options over the recipe's."""
        name = self.recipe if self.recipe != "auto" else auto_recipe(backbone.is_encoder_decoder, backbone.token_layout)
        recipe = RECIPES[name]
        own = {"r": self.r, "projection": None if self.projection == "auto" else self.projection,
               "restore": self.restore, "init": self.init, "drop_every": self.drop_every}
        return {k: recipe[k] if v is None else v for k, v in own.items()}

    def validate(self):
        check(self.recipe == "auto" or self.recipe in RECIPES,
              f"sherl.recipe must be auto or one of {', '.join(RECIPES)}, got {self.recipe!r}")
        check(self.r is None or self.r >= 1,
              f"sherl.r must be a positive integer (side width = hidden_size // r) or None, got {self.r}")
        check(self.init is None or self.init in INITS,
              f"sherl.init must be one of {', '.join(INITS)} (or None: the recipe's), got {self.init!r}")
        check(self.late_layers >= 1, f"sherl.late_layers must be >= 1, got {self.late_layers}")
        check(self.temperature > 0, f"sherl.temperature must be > 0, got {self.temperature}")
        check(self.projection in PROJECTIONS,
              f"sherl.projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        check(self.restore is None or self.restore in RESTORES, f"sherl.restore must be one of {', '.join(RESTORES)}, got {self.restore!r}")
        check(self.drop_every is None or self.drop_every >= 0,
              f"sherl.drop_every must be None or >= 0 (0 keeps every layer), got {self.drop_every}")
        check(self.tap_storage in TAP_STORAGES,
              f"sherl.tap_storage must be one of {', '.join(TAP_STORAGES)}, got {self.tap_storage!r}")
        check(self.form in FORMS, f"sherl.form must be one of {', '.join(FORMS)}, got {self.form!r}")
        self.validate_retrieval(self.form == "retrieval")
        self.validate_trunk_cache()

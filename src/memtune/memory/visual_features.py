"""Pre-extracted visual features as the vision half of a planned image-text composition (LST's CLIP-T5 form).

    config, _ = resolve_config("clip-rn101-grid+t5-base-vl")    # the paper's form: no vision encoder in the step

LST's CLIP-T5 never loads CLIP: its loader reads CLIP-ResNet-101 grid features extracted once, G ∈ ℝ^{L×f}
(f = 2048, L = rows·cols), and the step pools them to 6×6 = 36 tokens without parameters (docs/methods/vl.md
§2.1; specs/vl.md §2.1). A `VisualFeaturesConfig` (model_type "visual_features", a shipped JSON such as
configs/clip-rn101-grid.json) describes such a source: the feature width f and the grid, and nothing else; it
has no parameters and no compute. Planning the composition with it instead of a vision encoder is the least
invented way to express "pre-extracted features": the same composed backbone (`backbones/image_text.py`) and
the same methods run, and the only difference is where the B×L×f visual input comes from.

How it plugs in. The composed backbone asks its vision part for `embed` → `forward_intermediates` → `finish`
→ `grid_tokens` on batch["pixel_values"]. `GridFeatureBackbone` answers with the features themselves: the
planned batch's "pixel_values" entry holds the loader's B×L×f features (`planning_features`; the key is the
composed backbone's name for its visual input), zero blocks run, and ctx["grid"] = (rows, cols) lets the
composed backbone pool them to grid×grid. The features count as an input of the step (B·L·f elements).

The grid of the released features is unverified (specs/vl.md §2.1, §7: 7×7 at 224 px or 14×14 at the
extractor's 448 px; both pool to 6×6): the shipped config takes 7×7, the run name's `image224`; a 14×14 source
only changes the input bytes (B·196·f instead of B·49·f).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..backbones.base import Backbone, UnsupportedModel

MODEL_TYPE = "visual_features"


@dataclass
class VisualFeaturesConfig:
    """A source of pre-extracted grid features: width f (`hidden_size`) on a rows×cols grid."""
    hidden_size: int                 # f, the width of each grid feature (2048 for CLIP RN101)
    grid: tuple[int, int]            # (rows, cols) of the extracted grid
    description: str = ""
    _name_or_path: str = ""
    model_type: str = field(default=MODEL_TYPE, init=False)
    # The composed backbone sizes a default image from this; a feature source has none (see planning_features).
    image_size: int = field(default=1, init=False)

    def __post_init__(self):
        grid = tuple(self.grid) if isinstance(self.grid, (list, tuple)) else (self.grid, self.grid)
        ok = len(grid) == 2 and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)
        if not ok:
            raise ValueError(f"visual features: grid must be [rows, cols] of positive integers (or one integer for "
                             f"a square grid), got {self.grid!r}")
        if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise ValueError(f"visual features: hidden_size (the feature width f) must be a positive integer, got "
                             f"{self.hidden_size!r}")
        self.grid = grid

    @property
    def tokens(self) -> int:
        """L = rows·cols features per image."""
        return self.grid[0] * self.grid[1]

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "VisualFeaturesConfig":
        known = {"model_type", "hidden_size", "grid", "description"}
        unknown = sorted(set(d) - known)
        if unknown or "hidden_size" not in d or "grid" not in d:
            raise ValueError(f"{where}: a {MODEL_TYPE} config holds hidden_size (feature width) and grid ([rows, "
                             f"cols]), optionally description; "
                             + (f"unknown: {', '.join(unknown)}" if unknown else "missing hidden_size or grid"))
        return cls(d["hidden_size"], d["grid"], d.get("description", ""), where)


class GridFeatureSource(nn.Module):
    """The "vision model" of a composition over pre-extracted features: no weights, no compute.

    It holds one empty parameter (0 elements) only so that `next(parameters())` tells the composed backbone the
    dtype to read the visual input in (`ImageTextBackbone.visual_tokens` asks the vision part for it)."""

    def __init__(self, config: VisualFeaturesConfig):
        super().__init__()
        self.config = config
        self.dtype_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def memtune_backbone(self) -> "GridFeatureBackbone":
        return GridFeatureBackbone(self)


class GridFeatureBackbone(Backbone):
    """An image "backbone" with zero blocks whose token states are the pre-extracted B×L×f grid features."""
    family = MODEL_TYPE
    modality = "image"
    token_layout = "grid"
    input_keys = ("pixel_values",)

    def __init__(self, model: GridFeatureSource):
        super().__init__(model)
        self._blocks = nn.ModuleList()

    @property
    def blocks(self) -> nn.ModuleList:
        return self._blocks

    def embed(self, batch):
        """batch["pixel_values"]: the features B×L×f (L = rows·cols, row-major) → themselves, ctx["grid"]."""
        feats = batch["pixel_values"]
        rows, cols = self.config.grid
        if feats.dim() != 3 or feats.shape[1] != rows * cols or feats.shape[2] != self.config.hidden_size:
            raise UnsupportedModel(f"visual features: expected B×{rows * cols}×{self.config.hidden_size} grid "
                                   f"features (a {rows}×{cols} grid of width {self.config.hidden_size}), got "
                                   f"{tuple(feats.shape)}")
        return feats, {"grid": (rows, cols)}

    def run_block(self, i, h, ctx):
        raise IndexError(f"visual features have no blocks (asked for block {i})")


def is_feature_source(vision_config) -> bool:
    return getattr(vision_config, "model_type", None) == MODEL_TYPE


def planning_features(config: VisualFeaturesConfig, batch_size: int, dtype=torch.float32, device="meta"):
    """The loader's pre-extracted features of one planned batch: B×L×f zeros."""
    return torch.zeros(batch_size, config.tokens, config.hidden_size, dtype=dtype, device=device)

"""Planner facts of image-text compositions (`backbones/image_text.py`), read off their configs with no model built.

    config, _ = resolve_config("clip-vit-b16+t5-base")      # an ImageTextConfig (vision_config, text_config, grid)
    depth(config)                                          # 12: the text backbone's blocks, as a plan reports
    hf = build_model(config)                               # ImageTextModel on the current default device

A composition's depth, depth extrapolation (`layers=k`) and objective are its text backbone's: the planner
extrapolates per text block, and the vision part (a fixed cost, or nothing for pre-extracted features) is in
both plans it extrapolates from. Every other config passes through unchanged, so the planner calls these
helpers for any config.
"""
from __future__ import annotations

import copy

from ..backbones import family_class
from .visual_features import GridFeatureSource, is_feature_source

IMAGE_TEXT = "image_text"


def is_composition(config) -> bool:
    return getattr(config, "model_type", None) == IMAGE_TEXT


def text_config(config):
    """The config whose blocks a plan counts: the text part's for a composition, else the config itself."""
    return config.text_config if is_composition(config) else config


def depth(config) -> int:
    t = text_config(config)
    return family_class(t).depth(t)


def stacks_equally_deep(config) -> bool:
    t = text_config(config)
    return family_class(t).stacks_equally_deep(t)


def with_depth(config, blocks: int):
    """A copy with `blocks` blocks in every stack of the (text) backbone; the vision part is kept."""
    t = text_config(config)
    deeper = family_class(t).with_depth(t, blocks)
    if not is_composition(config):
        return deeper
    out = copy.copy(config)
    out.text_config = deeper
    return out


def set_attention(config, attn: str) -> None:
    """The attention kernel for every part of the model (both halves of a composition)."""
    parts = (config.vision_config, config.text_config) if is_composition(config) else (config,)
    for part in parts:
        part._attn_implementation = attn


def build_model(config):
    """The Hugging Face model of `config` with fresh weights on the current default device; a composition's
    two parts composed (a feature source's vision part has no weights), unused parts dropped as `load_model`
    drops them."""
    from ..backbones.image_text import ImageTextModel
    from ..models import drop_unused_parts, model_from_config

    if not is_composition(config):
        hf = model_from_config(config)
        drop_unused_parts(hf)
        return hf
    vc = config.vision_config
    vision = GridFeatureSource(vc) if is_feature_source(vc) else model_from_config(vc)
    text = model_from_config(config.text_config)
    for part in (vision, text):
        drop_unused_parts(part)
    return ImageTextModel(vision, text, config.grid, config._name_or_path)


def visual_source(config, image_size: int | None = None) -> str | None:
    """How a composition's visual tokens are made, in words (None for other models)."""
    if not is_composition(config):
        return None
    vc, grid = config.vision_config, config.grid
    if is_feature_source(vc):
        rows, cols = vc.grid
        return (f"pre-extracted {vc.hidden_size}-d features on a {rows}×{cols} grid, pooled to {grid}×{grid}; "
                "no vision encoder in the step")
    return (f"a frozen {vc.model_type} encoder on {image_size or vc.image_size} px images, pooled to "
            f"{grid}×{grid}")

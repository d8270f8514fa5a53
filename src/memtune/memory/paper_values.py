"""Published "% trainable" figures the planner prints next to its own, where the workload is the paper's.

    attach_paper_values(plan_result.methods, config, "seq2seq")   # sets MethodPlan.paper_pct / paper_source

A figure applies only when the planned model has the paper's architecture (the named known model, compared
field by field, so a synonym or a local copy of it matches too), the method's resolved options equal the
paper's and so does the objective (CLIP-T5 is text-to-text: no classification head). Each figure carries its
status (docs/methods/anchors.md): here only LST's CLIP-T5 row, which the spec derives from the released code
and recalls from the paper's Table 3 (specs/vl.md §2.6: unverified).

Where the planned model differs from the paper's by design, the difference is shown, not hidden: memtune's visual
embedding of image-text compositions (`backbones/visual_embedding.py`: trainable per-index codes, a type vector)
has a few more parameters than the released CLIP-T5 MLP's (f + 11)·d (a box branch, frozen per-index rows).
Every T5-composition row therefore also gets `official_trainable_params`: its trainable count with the released
MLP in place of memtune's (LST at r = 4: 17,967,384 = 7.46 % of all parameters; memtune's own row is 0.01 higher).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..methods import config_for


@dataclass(frozen=True)
class PaperValue:
    model: str                 # a known model name (resolve_config) with the paper's architecture
    method: str
    options: tuple             # (option, value) pairs the method's resolved config must have
    objective: str             # the training objective (a classification head would add its parameters)
    pct: float
    source: str


PAPER_VALUES = (
    PaperValue("clip-rn101-grid+t5-base-vl", "lst", (("r", 4), ("keep_layers", None)), "seq2seq", 7.46,
               "LST Table 3 (CLIP-T5, r = 4, all 12 layers): trainable / all parameters, side network + visual "
               "MLP, as the released code prints it; the paper's value is a recollection (unverified, "
               "specs/vl.md §2.6)"),
)


def _architecture(config) -> dict:
    """A config's fields that fix the model (the kernel choice and names aside), for comparing two models."""
    def fields(c):
        d = c.to_dict() if hasattr(c, "to_dict") else dataclasses.asdict(c)
        return {k: v for k, v in d.items() if not k.startswith("_") and k not in
                ("transformers_version", "dtype", "torch_dtype", "architectures", "name_or_path")}
    if getattr(config, "model_type", None) == "image_text":
        return {"vision": fields(config.vision_config), "text": fields(config.text_config), "grid": config.grid}
    return fields(config)


def _matches(value: PaperValue, m, architecture: dict, objective: str) -> bool:
    from .known_configs import resolve_config

    # (Memory techniques change no parameter count: any row of the method matches.)
    if m.status != "ok" or m.method != value.method or objective != value.objective:
        return False
    try:
        resolved = config_for(m.method, m.options)
    except Exception:  # noqa: BLE001 - options the row was planned with always resolve; be safe
        return False
    if any(getattr(resolved, k, object()) != v for k, v in value.options):
        return False
    return _architecture(resolve_config(value.model)[0]) == architecture


# The methods of the released VL-T5 / CLIP-T5 code, every one of which trains the visual MLP (specs/vl.md §2.5).
RELEASED_VL_METHODS = ("full", "lora", "adapter", "bitfit", "lst")


def official_visual_mlp_params(visual_width: int, width: int) -> int:
    """(f + 11)·d: the official CLIP-T5 visual MLP (`L:VL/modeling_t5.py:46-176`; specs/vl.md §2.1): W_f and b_f
    (f·d + d), its RMS norm (d), the box branch W_p, b_p and its RMS norm (5d + d + d), the 2-row image-order
    table (2d); its per-index codes are frozen rows of the shared embedding."""
    return (visual_width + 11) * width


def official_trainable(m, config) -> int | None:
    """A T5 composition's row with the official visual MLP in place of memtune's visual embedding, whose
    (f + 5 + V)·d parameters have a type vector, an image-order pair and trainable per-index codes instead
    (docs/methods/vl.md §2): trainable − memtune's visual embedding + (f + 11)·d. None for other rows."""
    if (m.status != "ok" or not m.visual_params or m.method not in RELEASED_VL_METHODS
            or getattr(config, "model_type", None) != "image_text" or config.text_config.model_type != "t5"):
        return None
    return m.trainable_params - m.visual_params + official_visual_mlp_params(config.vision_config.hidden_size,
                                                                             config.text_config.d_model)


def attach_paper_values(methods, config, objective: str) -> None:
    """Fill paper_pct / paper_source on the rows whose method, model and objective are a paper's, and the
    official-MLP trainable count on T5 compositions' rows (with a note where a paper value is known)."""
    architecture = _architecture(config)
    for m in methods:
        m.official_trainable_params = official_trainable(m, config)
        for value in PAPER_VALUES:
            if _matches(value, m, architecture, objective):
                m.paper_pct, m.paper_source = value.pct, value.source
                m.notes.append(f"paper: {value.pct:.2f} % ({value.source})")
                if m.official_trainable_params is not None:
                    n = m.official_trainable_params
                    pct = 100.0 * n / (m.total_params - m.trainable_params + n)
                    mlp = m.visual_params - m.trainable_params + n
                    m.notes.append(f"with the official visual MLP ((f + 11)·d = {mlp:,} parameters, where memtune's "
                                   f"visual embedding has {m.visual_params:,}: trainable per-index codes instead of "
                                   f"frozen embedding rows, a type vector instead of the box branch; "
                                   f"docs/methods/vl.md §2) this row would train {n:,} = {pct:.2f} % of all "
                                   "parameters")

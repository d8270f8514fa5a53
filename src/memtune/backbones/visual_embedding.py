"""The trainable visual embedding of image-text compositions (docs/methods/vl.md): frozen visual tokens → the
width of the network that reads them.

    e_v[k] = Norm(W_v·v[k] + b_v) + t_v + p_k          v: B×V×d_v (backbone.visual_tokens) → e_v: B×V×width

t_v is one learned type vector shared by the visual tokens, p_k a learned code per visual index k (row-major
over the pooled grid); Norm is an RMS norm (T5's norm type, as the official CLIP-T5 visual MLP) or a LayerNorm
(BERT-like text families).

Two readers use it:
- LST-VL (mode A, `methods/lst`): the side network's input (see `methods/lst/visual.py` for the factorised
  form, width = d read through W0, and the parameter count against the official MLP);
- the prefix of mode B (`backbones/image_text.py`): width = d, prepended to the text embedding output, for the
  methods that run the text backbone's own forward (full, LoRA, adapters, ...).

Trainable parameters: (d_v + 3 + V)·width with the RMS norm (W_v and b_v, the norm's weight, t_v, V position
codes), one width more with a LayerNorm (its bias).
"""
from __future__ import annotations

import torch
from torch import nn

NORMS = ("rms", "layer")


class VisualEmbedding(nn.Module):
    def __init__(self, visual_width: int, width: int, tokens: int, factorised: bool = True, eps: float = 1e-6,
                 norm: str = "rms", what: str = "visual embedding"):
        super().__init__()
        for name, value in (("visual_width", visual_width), ("width", width), ("tokens", tokens)):
            if value < 1:
                raise ValueError(f"{what}: {name} must be >= 1, got {value}")
        if norm not in NORMS:
            raise ValueError(f"{what}: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self.what = what
        self.factorised = factorised
        self.tokens = tokens
        self.proj = nn.Linear(visual_width, width)                  # W_v, b_v: d_v → width
        self.norm = nn.RMSNorm(width, eps=eps) if norm == "rms" else nn.LayerNorm(width, eps=eps)
        # t_v starts at 0; the codes start as random unit-scale rows, like the official frozen embedding rows,
        # so positions are told apart from the first step.
        self.type_code = nn.Parameter(torch.zeros(width))
        self.position_codes = nn.Parameter(torch.randn(tokens, width))

    @staticmethod
    def parameter_count(visual_width: int, width: int, tokens: int, norm: str = "rms") -> int:
        """(d_v + 3 + V)·width: W_v (d_v·width), b_v, the norm weight, t_v (width each), V codes; + width for a
        LayerNorm's bias."""
        return (visual_width + 3 + tokens + (norm == "layer")) * width

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """v: B×V×d_v (frozen) → e_v: B×V×width."""
        if v.shape[1] != self.tokens:
            raise ValueError(f"{self.what}: got {v.shape[1]} visual tokens per example, built for "
                             f"{self.tokens} (the composition's grid²)")
        return self.norm(self.proj(v)) + self.type_code + self.position_codes

"""LST-VL's trainable visual embedding (the VL spec §2.1, §4): frozen visual tokens → side-network inputs.

    e_v[k] = Norm(W_v·v[k] + b_v) + t_v + p_k          v: B×V×d_v (backbone.visual_tokens) → e_v: B×V×width

t_v is one learned type vector shared by the visual tokens, p_k a learned code per visual index k (row-major
over the pooled grid); Norm is an RMS norm (T5's norm type, as the official CLIP-T5 visual MLP).

factorised=True (default, the official form): width = d, the backbone width, and the side reads
s = W0·drop([E_x ; e_v]): the side's own W0 maps text and visual tokens alike, so the visual path is
W0∘VisualEmbedding. factorised=False: width = d', and e_v joins the side sequence directly,
s = [W0·drop(E_x) ; drop(e_v)].

Trainable parameters: (d_v + 3 + V)·width (W_v and b_v, the norm's weight, t_v, V position codes). The official
MLP has (f + 11)·d = 1,581,312 at f = 2048, d = 768: its box branch (7d) is a constant at zero boxes, its
image-order table has 2 rows (2d), and its per-index codes are frozen embedding rows; here the constant is the
one vector t_v (d) and the codes train (V·d), so at V = 36 this is (f + 39)·d = 1,602,816.
"""
from __future__ import annotations

import torch
from torch import nn


class VisualSideEmbedding(nn.Module):
    def __init__(self, visual_width: int, width: int, tokens: int, factorised: bool = True, eps: float = 1e-6):
        super().__init__()
        for name, value in (("visual_width", visual_width), ("width", width), ("tokens", tokens)):
            if value < 1:
                raise ValueError(f"lst visual embedding: {name} must be >= 1, got {value}")
        self.factorised = factorised
        self.tokens = tokens
        self.proj = nn.Linear(visual_width, width)                  # W_v, b_v: d_v → width
        self.norm = nn.RMSNorm(width, eps=eps)
        # t_v starts at 0; the codes start as random unit-scale rows, like the official frozen embedding rows,
        # so positions are told apart from the first step.
        self.type_code = nn.Parameter(torch.zeros(width))
        self.position_codes = nn.Parameter(torch.randn(tokens, width))

    @staticmethod
    def parameter_count(visual_width: int, width: int, tokens: int) -> int:
        """(d_v + 3 + V)·width: W_v (d_v·width), b_v, the norm weight, t_v (width each), V codes."""
        return (visual_width + 3 + tokens) * width

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """v: B×V×d_v (frozen) → e_v: B×V×width."""
        if v.shape[1] != self.tokens:
            raise ValueError(f"lst visual embedding: got {v.shape[1]} visual tokens per example, built for "
                             f"{self.tokens} (the composition's grid²)")
        return self.norm(self.proj(v)) + self.type_code + self.position_codes

"""QST's downsample modules D_i: a backbone layer's output B×T×d → the side width B×T×d' (d' = d/r).

The trainable forms keep their input (a frozen B×T×d hidden state) for the weight gradient of their
first matrix, in the form `tap_storage` says (full, bf16 or int8: `TapLinear`); the pooling forms have
no parameters, so nothing of the backbone is kept for backward.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ..common.compact_linear import TapLinear


class AdapterDownsample(nn.Module):
    """D(x) = LN_{d'}(W_B·act(W_A·x)), W_A: k×d, W_B: d'×k, no biases; k(d+d') + 2d' parameters.

    `activation=False` is the paper's "LoRA" form W_B·W_A·x. Both matrices take PyTorch's default
    (Kaiming-uniform) init: the released code does not zero W_B, and the side path is switched off at
    the start by the output mix instead.
    """

    def __init__(self, d: int, d_side: int, rank: int, activation: bool = True, tap_storage: str = "full"):
        super().__init__()
        self.down = TapLinear(d, rank, bias=False, tap_storage=tap_storage)   # W_A: reads the frozen tap
        self.up = nn.Linear(rank, d_side, bias=False)       # W_B
        self.norm = nn.LayerNorm(d_side)
        self.activation = activation

    def forward(self, x):                                     # B×T×d → B×T×d'
        z = self.down(x)                                      # B×T×k
        if self.activation:
            z = F.silu(z)                                     # swish
        return self.norm(self.up(z))


class ChannelPool(nn.Module):
    """Average or max over r contiguous channels: x[..., j·r:(j+1)·r] → one side channel j. No parameters."""

    def __init__(self, r: int, kind: str):
        super().__init__()
        self.r, self.kind = r, kind

    def forward(self, x):                                     # B×T×d → B×T×(d/r)
        groups = x.unflatten(-1, (x.shape[-1] // self.r, self.r))   # B×T×d'×r
        return groups.mean(-1) if self.kind == "avgpool" else groups.amax(-1)

    def extra_repr(self):
        return f"r={self.r}, kind={self.kind}"


def make_downsample(kind: str, d: int, d_side: int, rank: int, r: int, tap_storage: str = "full") -> nn.Module:
    if kind == "adapter":
        return AdapterDownsample(d, d_side, rank, activation=True, tap_storage=tap_storage)
    if kind == "lora":
        return AdapterDownsample(d, d_side, rank, activation=False, tap_storage=tap_storage)
    if kind == "linear":
        return TapLinear(d, d_side, bias=False, tap_storage=tap_storage)
    if kind in ("avgpool", "maxpool"):
        return ChannelPool(r, kind)
    raise ValueError(kind)


"""The Compact Side Network's pieces: rank-r reads of block inputs, Swish-β, and the DTL+ fusion.

    read_i(x)  = (x @ A_iᵀ) @ B_iᵀ          x: B×T×D, A_i: r×D (Linear init), B_i: D×r (zeros)
    θ_β(u)     = u · σ(β·u)                  element-wise; θ'(0) = 0.5, θ → ReLU as β → ∞
    G(u)       = u                           DTL
               = depthwise conv of u         DTL+ (one conv shared by every add-back position)
"""
from __future__ import annotations

import torch
from torch import nn

from ..common.compact_linear import TapLinear


class _Swish(torch.autograd.Function):
    """u·σ(βu) that saves only u for backward (plain autograd would also keep σ(βu): B×T×D more)."""

    @staticmethod
    def forward(ctx, u, beta: float):
        ctx.save_for_backward(u)
        ctx.beta = beta
        return u * torch.sigmoid(beta * u)

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        s = torch.sigmoid(ctx.beta * u)
        # d/du [u σ(βu)] = σ(βu) + βu σ(βu)(1 − σ(βu))
        return grad * (s + ctx.beta * u * s * (1 - s)), None


def swish(u: torch.Tensor, beta: float) -> torch.Tensor:
    """θ_β(u) = u·sigmoid(β·u)."""
    return _Swish.apply(u, float(beta))


class LowRankRead(nn.Module):
    """x ↦ (x Aᵀ) Bᵀ: what block i's input adds to the side state h. `down.weight` is A, `up.weight` is B."""

    def __init__(self, d: int, rank: int, tap_storage: str = "full", device=None, dtype=None):
        super().__init__()
        # A: r×D, kaiming_uniform(a=√5); a frozen input is saved as `tap_storage` for A's gradient.
        self.down = TapLinear(d, rank, bias=False, tap_storage=tap_storage, device=device, dtype=dtype)
        self.up = nn.Linear(rank, d, bias=False, device=device, dtype=dtype)     # B: D×r
        nn.init.zeros_(self.up.weight)   # side output 0 at init: the model starts as the backbone

    def forward(self, x):                   # B×T×D → B×T×D
        return self.up(self.down(x))


class Injection(nn.Module):
    """G(θ_β(h)): what is added to the output of every add-back block.

    `layout` says how tokens are arranged for the DTL+ conv:
    - "grid" (ViT-like): the last rows·cols tokens are the patch grid (`ctx["grid"]`, set by the backbone's
      `embed` for every input size, or the `grid` given: a hierarchical backbone's stage grid); the tokens
      before them (CLS, registers) pass through unchanged, and with none (Swin) the whole map is convolved.
      Conv2d(D, D, k, groups=D, padding='same'); any grid shape, square or not, is supported.
    - "sequence" (BERT-like): the tokens are a 1-D sequence; Conv1d(D, D, k, groups=D, padding='same') over
      the token axis, every position included ([CLS] is just the first position: these models pool by mean).
      Padded positions (`ctx["token_mask"]` = 0) are zeroed before the conv, so padding never leaks into real
      tokens, and after it, so padded positions receive nothing: results do not depend on the padded length.
    For even k, PyTorch's 'same' puts the extra padding on the right (and bottom), as the reference code.
    """

    def __init__(self, d: int, beta: float, fusion: str | None, kernel: int, layout: str, device=None, dtype=None):
        super().__init__()
        self.beta = beta
        self.layout = layout
        self.conv: nn.Module | None = None
        if fusion == "dwconv":
            conv = nn.Conv2d if layout == "grid" else nn.Conv1d
            # PyTorch default init (Kaiming-uniform); harmless since h = 0 at init. 'same' padding is applied in
            # `_same` (PyTorch's own rule: left (k−1)//2, the rest right), without the even-k copy warning.
            self.conv = conv(d, d, kernel, groups=d, bias=False, device=device, dtype=dtype)
            k = kernel - 1
            self.pad = (k // 2, k - k // 2)

    def forward(self, h: torch.Tensor, ctx, grid: tuple[int, int] | None = None) -> torch.Tensor:
        # h: B×T×D → B×T×D; grid: (rows, cols) of the tokens' patch grid (default ctx["grid"])
        u = swish(h, self.beta)
        if self.conv is None:
            return u
        if self.layout == "grid":
            rows, cols = grid or ctx["grid"]
            b, t, d = u.shape
            prefix = t - rows * cols                                  # CLS (+ register tokens)
            if prefix < 0:
                raise ValueError(f"dtl+: patch grid {rows}×{cols} has more cells than the {t} tokens")
            grid = u[:, prefix:].transpose(1, 2).reshape(b, d, rows, cols)          # B×D×rows×cols
            patches = self._same(grid).flatten(2).transpose(1, 2)                     # B×(rows·cols)×D
            return torch.cat([u[:, :prefix], patches], dim=1)
        mask = ctx.get("token_mask")
        if mask is None:
            return self._same(u.transpose(1, 2)).transpose(1, 2)
        m = mask.to(u.dtype).unsqueeze(-1)                                           # B×T×1
        return self._same((u * m).transpose(1, 2)).transpose(1, 2) * m

    def _same(self, x):
        """The depthwise conv with 'same' output size: x is B×D×T or B×D×rows×cols."""
        pad = self.pad * (x.dim() - 2)          # F.pad lists the last dim first: (left, right[, top, bottom])
        return self.conv(torch.nn.functional.pad(x, pad))

"""SHERL on hierarchical backbones (Swin): every collected output brought to the guide's grid and width.

The released VSE∞ image fork runs SHERL on a ResNeXt, whose stages differ in width and resolution: the outputs
of layer1, layer2, layer3 and layer4[:2] are max+avg pooled to the grid of the last one (16×16) and go through a
1×1 conv + BatchNorm each before the MTSA. memtune does the same on a stage backbone (`backbone.stage_starts`,
`block_widths`, `stage_grid`; base.py):

    F_l                   B×(r_s·c_s)×d_s     in-stage output of block l (before a stage transition), stage s
    P̄_l = MaxPool(F_l) + AvgPool(F_l)   B×(R·C)×d_s    parameter-free, to the guide's grid (R, C); no graph
    F̂_l = LN(W_l P̄_l + b_l)            B×(R·C)×D_g    trainable, only where d_s ≠ D_g (a 1×1 conv = a Linear
                                                       over channels; LayerNorm, Swin's own norm, for the BN)

then the MTSA at the guide's width D_g exactly as on a one-width backbone. Pooling runs before the trainable
map, so only the pooled maps are kept for its weight gradient (docs/methods/sherl.md §8).

Choices where the description leaves room (tested in tests/methods/test_sherl_swin.py):
- The pooling is adaptive (`adaptive_max_pool2d` + `adaptive_avg_pool2d` to the guide's grid): on grids that
  are exact multiples of the guide's (Swin at 224 px: 56, 28, 14 → 7) it is MaxPool(k) + AvgPool(k) with
  k = the ratio, as the released code; on the rounded-up grids of odd sizes its windows overlap by one cell.
- A feature already at the guide's width (its own stage) gets no projection and no pooling: it is exactly
  the one-width MTSA's input.
- The projections' linear maps start like the MTSA's (the recipe's `init`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common.compact_linear import TapLinear


def pool_to_grid(h: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """Tokens of a row-major patch grid, B×(rows·cols)×C → B×(R·C')×C at target = (R, C'): max + avg pooling.

    The identity when the grid already is the target."""
    rows, cols = grid
    if (rows, cols) == tuple(target):
        return h
    B, T, C = h.shape
    if T != rows * cols:
        raise ValueError(f"pool_to_grid: {T} tokens do not form the {rows}×{cols} grid")
    x = h.transpose(1, 2).reshape(B, C, rows, cols)                     # B×C×rows×cols
    y = F.adaptive_max_pool2d(x, target) + F.adaptive_avg_pool2d(x, target)   # B×C×R×C'
    return y.flatten(2).transpose(1, 2)                                 # B×(R·C')×C


class StageProjection(nn.Module):
    """The 1×1 conv + norm of the released hierarchical fork: B×T×d_s → B×T×D_g (Linear over channels, then
    LayerNorm). The Linear reads a frozen pooled map and keeps it as `tap_storage` for its weight gradient."""

    def __init__(self, d_in: int, D: int, tap_storage: str = "full"):
        super().__init__()
        self.linear = TapLinear(d_in, D, tap_storage=tap_storage)
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        return self.norm(self.linear(x))


def early_route_in_stages(backbone, h: torch.Tensor, ctx: dict, taps: list[int], stop: int
                          ) -> list[tuple[int, torch.Tensor]]:
    """Run blocks 0..stop-1 from the embedding output h; return (stage, in-stage output) of each block in `taps`.

    The last block run (stop-1) is left before its stage transition: that transition, if any, belongs to the
    late route (it runs on X̃). Call under torch.no_grad()."""
    keep, outs = set(taps), []
    for i in range(stop):
        y = backbone.run_block_in_stage(i, h, ctx)                      # B×T_s×d_s
        if i in keep:
            outs.append((backbone.stage_of(i), y))
        if i < stop - 1:
            h = backbone.stage_transition(i, y, ctx)
    return outs

"""The side network's parts (docs/methods/lst.md §2, §3, §5): ladders, gates and one side stack.

The side blocks are narrow blocks of the backbone's own class: `Backbone.side_config` gives their config,
d' = d/r, d_ff' = d_ff/r, per-head width d_kv/r with the head count H kept (or the nearest widths the
backbone's attention class accepts; `side_heads` replaces H where the backbone allows it).

A hierarchical backbone (Swin: stages of width C_s) gives a staged side stack: ladder i maps d_i → d'_i, the
widths of block i's stage, and a trainable side transition after the last block of a stage (Swin's side patch
merging) takes the side state to the next stage's grid and width. One-width backbones have neither.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..common.compact_linear import TapLinear


def small_normal_(linear: nn.Linear) -> nn.Linear:
    """Ladders, W0 and W_up (code): N(0, 0.01²) weights, zero biases."""
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.01)
        if linear.bias is not None:
            linear.bias.zero_()
    return linear


class SideStack(nn.Module):
    """One side stack (docs/methods/lst.md §3): W0, ladders W_i (i in K), gates alpha (one per backbone layer), side
    blocks S_i (i in K) and the side final norm.

        s = W0·drop(e) + b0
        for i in K:  mu = sigmoid(alpha_i / T_g);  s = mu·s + (1 − mu)·(W_i·h_i + b_i);  s = S_i(s)
        out = drop(Norm_side(s))

    Gates of dropped layers exist but are unused (docs/methods/lst.md §5: the code allocates N gates per stack, and
    the §9 parameter count includes them).

    Staged form: `layer_widths[i]` = (d_i, d'_i) are ladder i's widths (d → d_side is then W0's: the embedding
    output's width and the first stage's side width), and `transitions[i]` runs after block i's place (kept or
    not): s = T_i(s), to the next stage. `steps` lists the layers in order at which something runs.
    """

    def __init__(self, d: int, d_side: int, num_layers: int, keep: tuple[int, ...], blocks: list[nn.Module],
                 norm: nn.Module, dropout: float, gate_temperature: float, tap_storage: str = "full",
                 layer_widths: tuple[tuple[int, int], ...] | None = None,
                 transitions: dict[int, nn.Module] | None = None):
        super().__init__()
        self.keep = tuple(keep)
        self.temperature = gate_temperature
        widths = layer_widths or ((d, d_side),) * num_layers
        # Ladders read frozen taps: each keeps its input for the weight gradient as `tap_storage`.
        self.ladders = nn.ModuleDict({"embed": small_normal_(TapLinear(d, d_side, tap_storage=tap_storage))})
        for i in self.keep:
            self.ladders[str(i)] = small_normal_(TapLinear(*widths[i], tap_storage=tap_storage))
        self.blocks = nn.ModuleDict({str(i): b for i, b in zip(self.keep, blocks)})
        self.transitions = nn.ModuleDict({str(i): m for i, m in (transitions or {}).items()})
        self.steps = tuple(sorted(set(self.keep) | {int(i) for i in self.transitions}))
        self.out_width = widths[-1][1]                           # the width of s after the last step
        self.gates = nn.Parameter(torch.zeros(num_layers))      # alpha_i, N per stack
        self.norm = norm
        self.drop = nn.Dropout(dropout)                          # stateless: each call draws anew

    def block(self, i: int) -> nn.Module:
        return self.blocks[str(i)]

    def has_block(self, i: int) -> bool:
        return str(i) in self.blocks

    def transition(self, i: int) -> nn.Module | None:
        """The side transition after layer i (None inside a stage)."""
        return self.transitions[str(i)] if str(i) in self.transitions else None

    def mu(self, i: int) -> torch.Tensor:
        """The gate mu_i = sigmoid(alpha_i / T_g) (a 0-d tensor): the weight of the side state."""
        return torch.sigmoid(self.gates[i] / self.temperature)

    def start(self, e: torch.Tensor, drop: bool = True) -> torch.Tensor:
        """e: B×T×d frozen embedding output → s: B×T×d'. drop=False where e already carries the backbone's own
        embedding-dropout draw (one draw, as in the paper's W0·drop(e))."""
        return self.ladders["embed"](self.drop(e) if drop else e)

    def fuse(self, i: int, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Ladder i fused before side block i: s (B×Ts×d'_i), h (B×T×d_i, backbone block i output). Side-only
        positions after the T backbone positions (LST-VL's visual tokens, Ts = T+V) get a zero ladder, so
        there the fuse only scales s by mu."""
        mu = self.mu(i)
        ladder = self.ladders[str(i)](h)                                 # B×T×d'
        extra = s.shape[1] - ladder.shape[1]
        if extra > 0:
            ladder = F.pad(ladder, (0, 0, 0, extra))                     # B×(T+V)×d', zeros at visual rows
        return mu * s + (1 - mu) * ladder

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(s))

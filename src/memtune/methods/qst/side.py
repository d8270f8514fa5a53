"""QST's side network (docs/methods/qst.md §2-§4): the reduction factor, and the trainable parts.

Widths: d' = d/r, FFN ⌊d_ff/r⌋, H and KV heads kept, so the side head width is d/(rH). Unlike LST's
nearest-width rounding, QST needs d' exactly d/r (the pooling downsample maps r channels to one), so
r must divide d and d/r must be divisible by H (and whatever else the backbone's `side_width_problem` asks,
e.g. an even head width for rotary positions); the config is `Backbone.side_config(..., exact=True)`. With
`side_heads` H' the side blocks have H' heads of width d/(rH') instead.

Hierarchical backbones (Swin: stages of width C_s) give a staged side network: side blocks of stage s are
d'_s = C_s/r wide (heads H_s kept), downsample i maps C_s → d'_s of block i's stage, the vector gates are
d'_s wide, and a trainable side transition (Swin's side patch merging) after the last side block of a stage
takes the side state to the next stage's grid and width; Up maps the last stage's d' to C_last.
"""
from __future__ import annotations

import torch
from torch import nn

from ..base import ConfigError
from .config import DEFAULT_R
from .downsample import make_downsample


def fitting_rs(backbone, heads: int | None = None) -> list[int]:
    """Every reduction factor that gives valid side widths, smallest first."""
    return [r for r in range(1, backbone.config.hidden_size + 1) if backbone.side_width_problem(r, heads) is None]


def resolve_r(backbone, r: int | None, heads: int | None = None) -> tuple[int, str | None]:
    """(r to use, a note when the default had to be lowered). An explicit r that does not fit is refused."""
    problem = backbone.side_width_problem
    if r is not None:
        if problem(r, heads):
            fits = [x for x in fitting_rs(backbone, heads) if x <= 64]
            raise ConfigError(f"qst.r={r} does not fit this {backbone.family} backbone: {problem(r, heads)}; "
                              f"r values that fit: {', '.join(map(str, fits))}")
        return r, None
    if problem(DEFAULT_R, heads) is None:
        return DEFAULT_R, None
    fits = [x for x in fitting_rs(backbone, heads) if x <= DEFAULT_R]
    if not fits:
        raise ConfigError(f"qst: no reduction factor fits this {backbone.family} backbone ({problem(1, heads)})")
    chosen = fits[-1]
    return chosen, (f"qst: r={DEFAULT_R} does not fit this backbone ({problem(DEFAULT_R, heads)}); "
                    f"using r={chosen}")


class SideNetwork(nn.Module):
    """Downsamples D_0..D_{N-1}, gates z_0..z_{N-1}, side blocks G_0..G_{N-1}, the side final norm and Up.

        s = D_0(e)
        for i in 0..N-1:  β = σ(z_i);  s = G_i((1−β)⊙D_i(h_i) + β⊙s)      (D_0 is used twice)
                          staged, i ends a stage:  s = T_i(s)             (side transition, next stage)
        u = Up(Norm_side(s_N))                                           Up: Linear(d'_last → d_last, bias)

    One-width backbones: every D_i is d → d' and the gates are one (N, d') tensor (or (N, 1) for scalar gates).
    Staged (`layer_widths[i]` = (d_i, d'_i), the widths of block i's stage; D_0 reads the embedding output,
    which has stage 0's width): D_i is d_i → d'_i, vector gates are a ParameterList of N d'_i-vectors (their
    widths differ), and `transitions[i]` runs after side block i.

    One instance per backbone stack: an encoder–decoder has a side encoder, whose output stays at width d'
    (up=False: no Up, `finish` is the side norm alone; the side decoder cross-attends to it), and a side
    decoder with the Up that feeds the output mix (encoder_decoder.py).
    """

    def __init__(self, d: int, d_side: int, r: int, blocks: list[nn.Module], norm: nn.Module,
                 downsample: str, rank: int, gate: str, tap_storage: str = "full", up: bool = True,
                 layer_widths: tuple[tuple[int, int], ...] | None = None,
                 transitions: dict[int, nn.Module] | None = None):
        super().__init__()
        n = len(blocks)
        widths = tuple(layer_widths or ((d, d_side),) * n)
        if widths[0] != (d, d_side):
            raise ValueError(f"D_0 reads the embedding ({d} → {d_side}) and block 0's output {widths[0]}: "
                             f"the two must have the same widths")
        self.downsamples = nn.ModuleList(make_downsample(downsample, d_i, ds_i, rank, r, tap_storage)
                                         for d_i, ds_i in widths)
        # vector: z_i ∈ ℝ^{d'_i} at 0.5 (code); scalar: γ_i at 0 (paper). One width: shape (N, d') or (N, 1).
        gate_widths, start = ([ds_i for _, ds_i in widths], 0.5) if gate == "vector" else ([1] * n, 0.0)
        if len(set(gate_widths)) == 1:
            self.gates = nn.Parameter(torch.full((n, gate_widths[0]), start))
        else:                                                        # staged vector gates: N vectors of d'_i
            self.gates = nn.ParameterList(nn.Parameter(torch.full((w,), start)) for w in gate_widths)
        self.blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleDict({str(i): m for i, m in (transitions or {}).items()})
        self.norm = norm
        d_last, ds_last = widths[-1]
        self.up = nn.Linear(ds_last, d_last) if up else None

    def beta(self, i: int) -> torch.Tensor:
        """β_i = σ(z_i): the weight of the carried side state (d'_i or 1 values)."""
        return torch.sigmoid(self.gates[i])

    def transition(self, i: int) -> nn.Module | None:
        """The side transition after side block i (staged backbones, at the end of a stage), else None."""
        return self.transitions[str(i)] if str(i) in self.transitions else None

    def start(self, e: torch.Tensor) -> torch.Tensor:
        """e: B×T×d frozen embedding output → s: B×T×d'."""
        return self.downsamples[0](e)

    def fuse(self, i: int, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """s (B×T×d'_i) and backbone block i's output h (B×T×d_i) → the input of side block i (B×T×d'_i)."""
        return self.mix(i, s, self.downsamples[i](h))

    def mix(self, i: int, s: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """The gate of `fuse` on the downsampled tap down = Down_i(h) (B×T×d'_i)."""
        beta = self.beta(i)
        return (1 - beta) * down + beta * s

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        """s_N (B×T×d') → u = Up(Norm_side(s_N)) (B×T×d); without Up, Norm_side(s_N) (B×T×d')."""
        s = self.norm(s)
        return s if self.up is None else self.up(s)


class OutputMix(nn.Module):
    """o from h_N (B×T×d) and u (B×T×d) with a trained d-vector `weight` (docs/methods/qst.md §3, §4).

    paper:   o = α⊙h_N + (1−α)⊙u,        α starts at 1 (o = h_N exactly)
    sigmoid: o = σ(λ)⊙h_N + (1−σ(λ))⊙u,  λ starts at lambda_init (LLaMA orientation of the code)
    """

    def __init__(self, d: int, form: str, lambda_init: float):
        super().__init__()
        self.form = form
        self.weight = nn.Parameter(torch.full((d,), 1.0 if form == "paper" else float(lambda_init)))

    def backbone_share(self) -> torch.Tensor:
        """The d weights on h_N: α, or σ(λ)."""
        return self.weight if self.form == "paper" else torch.sigmoid(self.weight)

    def forward(self, h_final, u):
        a = self.backbone_share()
        return a * h_final + (1 - a) * u

    def extra_repr(self):
        return f"form={self.form}, d={self.weight.numel()}"

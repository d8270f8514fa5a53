"""QST's side network (docs/methods/qst.md §2-§4): widths, the narrowed block config, and the trainable parts.

Widths: d' = d/r, FFN ⌊d_ff/r⌋, H and KV heads kept, so the side head width is d/(rH). Unlike LST's
nearest-width rounding, QST needs d' exactly d/r (the pooling downsample maps r channels to one), so
r must divide d and d/r must be divisible by H (Llama-like: d/(rH) even, for rotary positions). With
`side_heads` H' (bert, vit) the side blocks have H' heads of width d/(rH') instead.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..base import ConfigError
from .config import DEFAULT_R
from .downsample import make_downsample


def heads_of(config) -> int:
    return config.num_attention_heads


def width_problem(family: str, config, r: int, heads: int | None = None) -> str | None:
    """Why reduction factor r does not fit this backbone, or None if it does. `heads`: the side head count
    (None: the backbone's H, kept)."""
    d = config.hidden_size
    kept = heads is None
    heads = heads_of(config) if kept else heads
    if d % r:
        return f"d={d} is not divisible by r={r}"
    if (d // r) % heads:
        whose = "attention heads (kept from the backbone)" if kept else "side heads (side_heads)"
        return f"the side width d/r={d // r} is not divisible by the {heads} {whose}"
    if family == "llama" and (d // r // heads) % 2:
        return f"the side head width d/(r·H)={d // r // heads} is odd; rotary positions need an even one"
    return None


def fitting_rs(family: str, config, heads: int | None = None) -> list[int]:
    """Every reduction factor that gives valid side widths, smallest first."""
    return [r for r in range(1, config.hidden_size + 1) if width_problem(family, config, r, heads) is None]


def resolve_r(family: str, config, r: int | None, heads: int | None = None) -> tuple[int, str | None]:
    """(r to use, a note when the default had to be lowered). An explicit r that does not fit is refused."""
    if r is not None:
        problem = width_problem(family, config, r, heads)
        if problem:
            fits = [x for x in fitting_rs(family, config, heads) if x <= 64]
            raise ConfigError(f"qst.r={r} does not fit this {family} backbone: {problem}; "
                              f"r values that fit: {', '.join(map(str, fits))}")
        return r, None
    if width_problem(family, config, DEFAULT_R, heads) is None:
        return DEFAULT_R, None
    fits = [x for x in fitting_rs(family, config, heads) if x <= DEFAULT_R]
    if not fits:
        raise ConfigError(f"qst: no reduction factor fits this {family} backbone "
                          f"({width_problem(family, config, 1, heads)})")
    chosen = fits[-1]
    return chosen, (f"qst: r={DEFAULT_R} does not fit this backbone "
                    f"({width_problem(family, config, DEFAULT_R, heads)}); using r={chosen}")


def side_config(family: str, config, r: int, attention: str = "auto", is_dinov2: bool = False,
                attention_dropout: float | None = None, heads: int | None = None):
    """A copy of the backbone config with the side widths (docs/methods/qst.md §2). Heads (unless `heads` is given), KV
    heads, rotary base, norm eps and the hidden dropout are the backbone's; `attention` other than "auto"
    sets the kernel and `attention_dropout` (None: the backbone's) the attention-probability dropout."""
    c = copy.deepcopy(config)
    if attention != "auto":
        c._attn_implementation = attention
    d_side = config.hidden_size // r
    c.hidden_size = d_side
    if heads is not None:
        c.num_attention_heads = heads                # bert (not MPNet) and vit: checked by the model
    if family in ("llama", "vit"):
        c.head_dim = d_side // heads_of(c)          # Llama and ViT/DINOv2 attention read an explicit head_dim
    if not is_dinov2:                               # DINOv2 sizes its MLP as hidden_size·mlp_ratio = d_ff/r
        c.intermediate_size = config.intermediate_size // r
    if attention_dropout is not None:
        setattr(c, "attention_dropout" if family == "llama" else "attention_probs_dropout_prob", attention_dropout)
    return c


class SideNetwork(nn.Module):
    """Downsamples D_0..D_{N-1}, gates z_0..z_{N-1}, side blocks G_0..G_{N-1}, the side final norm and Up.

        s = D_0(e)
        for i in 0..N-1:  β = σ(z_i);  s = G_i((1−β)⊙D_i(h_i) + β⊙s)      (D_0 is used twice)
        u = Up(Norm_side(s_N))                                           Up: Linear(d' → d, bias)
    """

    def __init__(self, d: int, d_side: int, r: int, blocks: list[nn.Module], norm: nn.Module,
                 downsample: str, rank: int, gate: str, tap_storage: str = "full"):
        super().__init__()
        n = len(blocks)
        self.downsamples = nn.ModuleList(make_downsample(downsample, d, d_side, rank, r, tap_storage)
                                         for _ in range(n))
        # vector: z_i ∈ ℝ^{d'} at 0.5 (code); scalar: γ_i at 0 (paper). Shape (N, d') or (N, 1).
        width, start = (d_side, 0.5) if gate == "vector" else (1, 0.0)
        self.gates = nn.Parameter(torch.full((n, width), start))
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.up = nn.Linear(d_side, d)

    def beta(self, i: int) -> torch.Tensor:
        """β_i = σ(z_i): the weight of the carried side state (d' or 1 values)."""
        return torch.sigmoid(self.gates[i])

    def start(self, e: torch.Tensor) -> torch.Tensor:
        """e: B×T×d frozen embedding output → s: B×T×d'."""
        return self.downsamples[0](e)

    def fuse(self, i: int, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """s (B×T×d') and backbone block i's output h (B×T×d) → the input of side block i (B×T×d')."""
        beta = self.beta(i)
        return (1 - beta) * self.downsamples[i](h) + beta * s

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        """s_N (B×T×d') → u = Up(Norm_side(s_N)) (B×T×d)."""
        return self.up(self.norm(s))


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

"""SHERL's Multi-Tiered Sensing Adapter (per token; n collected features, E = the first n-1, e = the last):

    F'_l = P_l(F_l)                                      B×K×d          d = D // r
    E = stack(F'_0..F'_{n-2}),  e = F'_{n-1}             B×K×(n-1)×d,  B×K×d
    Ê = E / max(‖E‖₂, ε)   S = Ê Êᵀ   ρ = ReLU(S)·𝟙        B×K×(n-1)×(n-1),  B×K×(n-1)
    m = ReLU(w_aᵀ(E ⊙ e) + b_a)                          B×K×(n-1)
    α = (m/ρ) / max(‖m/ρ‖₁, ε)                           B×K×(n-1)      L1, not softmax
    g = Σ_l α_l E_l + e                                  B×K×d
    X̃ = U(ReLU(g)) + tanh(γ/τ)·F_{N-L}                   B×K×D          γ = 0: the gate starts closed

Choices where the description leaves room (each is tested in tests/methods/test_sherl.py):
- ℓ2 guard: Ê = E / max(‖E‖₂, 1e-6) (F.normalize's form) rather than E / (‖E‖₂ + 1e-6), so the
  self-similarity of every row with norm ≥ ε is exactly 1 (up to rounding) and ρ ≥ 1 holds as stated.
- Divisor floor: the weights divide by max(ρ, 1). This changes nothing for rows of norm ≥ ε (ρ ≥ 1
  already); an all-zero projected feature (self-similarity 0, so ρ could be 0 and its weight unbounded)
  is treated as a unit vector orthogonal to all others, i.e. ρ = 1. `MTSA.terms` returns the unfloored ρ.
- L1 guard: α = x / max(‖x‖₁, 1e-6) instead of x / (‖x‖₁ + 1e-6). The two agree to within
  1e-6/‖x‖₁ relative, but only the max form keeps Σα = 1 ± 1e-5 whenever m has a positive entry (the
  sum form drifts below 1 once ‖x‖₁ < 0.1); both give α = 0 when m ≡ 0.
- Projections P_l: the gated adapter (u = ReLU(W₁F), F' = (W₂u + u)⊙σ(W₃u)) of the released T5 code, or
  Linear(D→d) → LayerNorm(d) (the VSE text / MDETR form, also the memory reference of
  docs/methods/sherl.md §9). U is Linear(d→D) ("linear") or Linear → LayerNorm(eps 1e-12) → Dropout(0.1)
  ("linear-ln", VSE text).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ConfigError
from ..common.compact_linear import TapLinear

EPS = 1e-6


class GatedProjection(nn.Module):
    """P_l of the CLIP-ViL / T5 code: u = ReLU(W₁F + b₁); F' = (W₂u + b₂ + u) ⊙ σ(W₃u + b₃)."""

    def __init__(self, D: int, d: int, tap_storage: str = "full"):
        super().__init__()
        self.down = TapLinear(D, d, tap_storage=tap_storage)     # reads a frozen feature F_l
        self.value = nn.Linear(d, d)
        self.gate = nn.Linear(d, d)

    def forward(self, x):                                     # B×K×D → B×K×d
        u = F.relu(self.down(x))
        return (self.value(u) + u) * torch.sigmoid(self.gate(u))


def make_projection(kind: str, D: int, d: int, tap_storage: str = "full") -> nn.Module:
    """P_l; its first linear map reads the frozen F_l and keeps it as `tap_storage` for its weight gradient."""
    if kind == "gated":
        return GatedProjection(D, d, tap_storage)
    return nn.Sequential(TapLinear(D, d, tap_storage=tap_storage), nn.LayerNorm(d))   # B×K×D → B×K×d


def make_restore(kind: str, d: int, D: int) -> nn.Module:
    if kind == "linear-ln":
        return nn.Sequential(nn.Linear(d, D), nn.LayerNorm(D, eps=1e-12), nn.Dropout(0.1))
    return nn.Linear(d, D)                                   # B×K×d → B×K×D


def init_linears(module: nn.Module, kind: str) -> None:
    """The MTSA's linear maps as a released fork starts them (config.INITS): "pytorch" leaves PyTorch's default;
    "normal-σ" draws weights from N(0, σ²) with zero biases (T5 fork 0.01, CLIP-ViL 0.02); "xavier" draws
    Xavier-uniform weights with zero biases (MDETR)."""
    if kind == "pytorch":
        return
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if kind == "xavier":
                nn.init.xavier_uniform_(m.weight)
            else:
                nn.init.normal_(m.weight, std=float(kind.split("-", 1)[1]))
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def redundancy(E: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E: B×K×M×d → (S: B×K×M×M cosine similarities, ρ = ReLU(S)·𝟙: B×K×M)."""
    E_hat = E / E.norm(dim=-1, keepdim=True).clamp_min(EPS)
    S = E_hat @ E_hat.transpose(-1, -2)
    return S, F.relu(S).sum(-1)


def layer_weights(m: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """α = (m/ρ) / max(‖m/ρ‖₁, ε) over the layer axis (m ≥ 0, so ‖·‖₁ is the sum). B×K×M → B×K×M."""
    x = m / rho.clamp_min(1.0)
    return x / x.sum(-1, keepdim=True).clamp_min(EPS)


class MTSA(nn.Module):
    """Multi-Tiered Sensing Adapter: n collected features B×K×D → X̃ B×K×D (see the module docstring)."""

    def __init__(self, num_features: int, D: int, d: int, projection: str = "linear-ln",
                 restore: str = "linear", gate_init: float = 0.0, temperature: float = 0.1,
                 tap_storage: str = "full", init: str = "pytorch"):
        super().__init__()
        if num_features < 2:
            raise ConfigError(f"sherl: the aggregator needs at least 2 collected features, got {num_features}")
        self.proj = nn.ModuleList(make_projection(projection, D, d, tap_storage) for _ in range(num_features))
        self.relevance = nn.Linear(d, 1)                     # w_a ∈ ℝ^d, scalar b_a
        self.up = make_restore(restore, d, D)
        init_linears(self, init)
        # b_a = 1 (PyTorch's default draws it from ±1/√d): m = ReLU(·) must start positive. A feature whose
        # m is zero on every token gets α = 0 and no gradient, and once a single feature is left alive the
        # normalisation makes its α ≡ 1, so w_a gets none either: the aggregation is off for good. With the
        # default draw that happened on tiny T5 for 10 of 20 seeds; with b_a = 1 every feature starts live.
        nn.init.ones_(self.relevance.bias)
        # Shape (1,), not a 0-dim scalar: FSDP2 refuses to shard 0-dim parameters.
        self.gamma = nn.Parameter(torch.full((1,), float(gate_init)))
        self.temperature = temperature

    @property
    def num_features(self) -> int:
        return len(self.proj)

    def terms(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every intermediate of §2 for the n features `feats` (each B×K×D), ending with X̃."""
        if len(feats) != self.num_features:
            raise ValueError(f"MTSA built for {self.num_features} features, got {len(feats)}")
        projected = [p(f) for p, f in zip(self.proj, feats)]  # n × B×K×d
        E = torch.stack(projected[:-1], dim=2)                # B×K×(n-1)×d
        e = projected[-1]                                     # B×K×d (the guide)
        S, rho = redundancy(E)                                # B×K×(n-1)×(n-1), B×K×(n-1)
        m = F.relu(self.relevance(E * e.unsqueeze(2))).squeeze(-1)   # B×K×(n-1)
        alpha = layer_weights(m, rho)                         # B×K×(n-1)
        g = (alpha.unsqueeze(-1) * E).sum(2) + e              # B×K×d
        G = self.up(F.relu(g))                                # B×K×D
        gate = torch.tanh(self.gamma / self.temperature)      # (1,), broadcast; 0 at init (closed)
        x = G + gate * feats[-1]                              # B×K×D
        return {"E": E, "e": e, "S": S, "rho": rho, "m": m, "alpha": alpha, "g": g, "G": G, "gate": gate,
                "x": x}

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.terms(feats)["x"]


def mtsa_param_count(n: int, D: int, d: int) -> int:
    """Trainable parameters of one MTSA with n features, gated P and a Linear U (§7's formula)."""
    return n * (D * d + d + 2 * (d * d + d)) + (d + 1) + (d * D + D) + 1

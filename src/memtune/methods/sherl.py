"""SHERL: a frozen early route without a graph, a light aggregator, and the last pretrained layer(s).

    early route (torch.no_grad):  F_0 = embed(x),  F_l = φ_l(F_{l-1}),  l = 1..N-L     each B×K×D
    MTSA (trainable):             X̃ = U(ReLU(g)) + tanh(γ/τ)·F_{N-L}                 B×K×D
    late route (frozen weights,   Y = φ_N(...φ_{N-L+1}(X̃)) → the backbone's final norm → pool → head
    gradient flows through it)

Only the collected features F_l (saved by the trainable projections P_l), the MTSA's activations and
the L late blocks' activations are kept for backward (Diao et al., "SHERL", ECCV 2024).

Multi-Tiered Sensing Adapter (per token; n collected features, E = the first n-1, e = the last):
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
  is treated as a unit vector orthogonal to all others, i.e. ρ = 1. `mtsa_terms` returns the unfloored ρ.
- L1 guard: α = x / max(‖x‖₁, 1e-6) instead of x / (‖x‖₁ + 1e-6). The two agree to within
  1e-6/‖x‖₁ relative, but only the max form keeps Σα = 1 ± 1e-5 whenever m has a positive entry (the
  sum form drifts below 1 once ‖x‖₁ < 0.1); both give α = 0 when m ≡ 0.
- Side width: d = hidden_size // r. The released T5 config uses r = 4 (d = 192 on T5-base); which r the
  paper's tables used is unknown, so r is a field (default 4).
- Projections P_l: `projection="auto"` picks the gated adapter (u = ReLU(W₁F), F' = (W₂u + u)⊙σ(W₃u))
  on T5 as the released T5 code, and Linear(D→d) → LayerNorm(d) (the VSE text / MDETR form, also the
  memory reference of docs/methods/sherl.md §9) elsewhere. U is Linear(d→D) (`restore="linear"`) or Linear → LayerNorm(eps
  1e-12) → Dropout(0.1) (`restore="linear-ln"`, VSE text).
- Which early outputs are collected: all of them (embedding + every early block) except that
  `drop_every=k` skips the outputs of 0-indexed blocks i with i % k == 0. The released T5 config does
  this with k = 4 (encoder: embedding + {1,2,3,5,6,7,9,10,11}; decoder: embedding + {1,2,3,5,6,7,9,10}),
  so `drop_every=None` means 4 on T5 and 0 (keep all) elsewhere. The guide F_{N-L} is always kept.
- `late_layers=L > 1` is a library extension (the paper always uses one late layer): the MTSA feeds
  the first of the last L blocks, which all run frozen with gradient flowing through them.
- BERT / ViT / Llama: after the late route come the backbone's own frozen final norm (ViT layernorm,
  Llama norm; BERT has none), pooling and the trainable head; for a Llama causal LM the frozen LM head.
- T5 (released wiring): the encoder has no late route. All encoder blocks run without a graph; the
  encoder MTSA (its guide: the last encoder block) → a new side T5LayerNorm (ones) → encoder dropout
  becomes the memory of the decoder's late block(s) only; earlier decoder blocks attend to the original
  encoder output. The decoder MTSA feeds the last L decoder blocks, followed by a second new side
  T5LayerNorm (ones) in place of the pretrained decoder final norm. memtune's T5 is used for
  classification (start-position state → head), so the released code's tied LM head × D^-1/2 does not
  apply. Trainable count (gated P, n features per MTSA):
  Σ_MTSA [n·(D·d + d + 2(d² + d)) + (d + 1) + (d·D + D) + 1] + 2·D.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import ConfigError, MemtuneModel, MethodConfig, check
from .common.compact_linear import TAP_STORAGES, TapLinear
from .common.trunk_cache import TrunkCacheOptions, cached_trunk, check_trunk_deterministic, trunk_eval_mode

EPS = 1e-6
PROJECTIONS = ("auto", "gated", "linear-ln")
RESTORES = ("linear", "linear-ln")


# -- MTSA pieces --------------------------------------------------------------------------------------
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
                 tap_storage: str = "full"):
        super().__init__()
        if num_features < 2:
            raise ConfigError(f"sherl: the aggregator needs at least 2 collected features, got {num_features}")
        self.proj = nn.ModuleList(make_projection(projection, D, d, tap_storage) for _ in range(num_features))
        self.relevance = nn.Linear(d, 1)                     # w_a ∈ ℝ^d, scalar b_a
        # b_a = 1 (PyTorch's default draws it from ±1/√d): m = ReLU(·) must start positive. A feature whose
        # m is zero on every token gets α = 0 and no gradient, and once a single feature is left alive the
        # normalisation makes its α ≡ 1, so w_a gets none either: the aggregation is off for good. With the
        # default draw that happened on tiny T5 for 10 of 20 seeds; with b_a = 1 every feature starts live.
        nn.init.ones_(self.relevance.bias)
        self.up = make_restore(restore, d, D)
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


def collected_blocks(num_early: int, drop_every: int) -> list[int]:
    """0-indexed early blocks whose outputs are collected (the embedding output is always collected).

    drop_every=k > 0 skips blocks i with i % k == 0; the last early block (the guide) is always kept.
    """
    return [i for i in range(num_early) if drop_every <= 0 or i % drop_every != 0 or i == num_early - 1]


def mtsa_param_count(n: int, D: int, d: int) -> int:
    """Trainable parameters of one MTSA with n features, gated P and a Linear U (§7's formula)."""
    return n * (D * d + d + 2 * (d * d + d)) + (d + 1) + (d * D + D) + 1


# -- the wrapped model --------------------------------------------------------------------------------
class SHERLModel(MemtuneModel):
    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        self.freeze_backbone()
        D = backbone.hidden_size
        d = D // config.r
        check(d >= 1, f"sherl.r={config.r} leaves a side width of 0 for hidden size {D}; allowed: 1..{D}")
        self.is_t5 = backbone.family == "t5"
        projection = config.projection
        if projection == "auto":
            projection = "gated" if self.is_t5 else "linear-ln"
        drop_every = config.drop_every if config.drop_every is not None else (4 if self.is_t5 else 0)
        late_stack = backbone.decoder_blocks if self.is_t5 else backbone.blocks
        depth = len(late_stack)
        check(config.late_layers < depth,
              f"sherl.late_layers={config.late_layers} leaves no early layer in this {depth}-layer "
              f"{'decoder' if self.is_t5 else 'stack'}; allowed: 1..{depth - 1}")
        self.num_early = depth - config.late_layers          # blocks of the late stack run without a graph
        self.side_width = d

        def mtsa(n):
            return MTSA(n, D, d, projection, config.restore, config.gate_init, config.temperature,
                        config.tap_storage)

        self.taps = collected_blocks(self.num_early, drop_every)
        self.mtsa = mtsa(1 + len(self.taps))
        if self.is_t5:
            from transformers.models.t5.modeling_t5 import T5LayerNorm

            eps = backbone.config.layer_norm_epsilon
            self.encoder_taps = collected_blocks(backbone.num_layers, drop_every)
            self.encoder_mtsa = mtsa(1 + len(self.encoder_taps))
            self.encoder_side_norm = T5LayerNorm(D, eps=eps)  # weight = ones
            self.side_norm = T5LayerNorm(D, eps=eps)          # replaces the decoder's final norm
        if config.cache_trunk:
            check(not self.is_t5, "sherl.cache_trunk is supported for bert, vit and llama backbones, not t5")
            check_trunk_deterministic("sherl", [backbone], config.trunk_dropout)
        self.trunk_cache = config.make_trunk_cache()

    @property
    def cache_bytes(self) -> int:
        """Host bytes held by the trunk cache (0 without one)."""
        return 0 if self.trunk_cache is None else self.trunk_cache.nbytes

    @property
    def late_blocks(self) -> list[nn.Module]:
        stack = self.backbone.decoder_blocks if self.is_t5 else self.backbone.blocks
        return list(stack[self.num_early:])

    @property
    def early_blocks(self) -> list[nn.Module]:
        """Blocks that run without an autograd graph (T5: the whole encoder and the early decoder)."""
        if self.is_t5:
            return list(self.backbone.blocks) + list(self.backbone.decoder_blocks[:self.num_early])
        return list(self.backbone.blocks[:self.num_early])

    def _early(self, h, ctx, run, count, taps):
        """Run `count` frozen blocks (caller holds no_grad); return [F_0, collected outputs...]."""
        keep = set(taps)
        feats = [h]                                            # F_0: B×K×D
        for i in range(count):
            h = run(i, h, ctx)
            if i in keep:
                feats.append(h)
        return feats

    def features(self, batch):
        bb = self.backbone
        if self.is_t5:
            return self._t5_features(batch)
        with torch.no_grad(), trunk_eval_mode(bb, not self.method_config.trunk_dropout):
            h, ctx = bb.embed(batch)
            mask = ctx.get("token_mask")
            cache = self.trunk_cache if self.training else None
            # With the cache (which stores real rows only) padded rows of the features are zero; real rows
            # are the same either way, since real tokens never attend to padded keys.
            real = (None if cache is None or mask is None or bool(mask.all())
                    else mask.to(h.dtype).unsqueeze(-1))       # B×K×1

            def compute():                                     # the collected early outputs, B×K×D each
                feats = self._early(h, ctx, bb.run_block, self.num_early, self.taps)[1:]
                return feats if real is None else [f * real for f in feats]

            feats = cached_trunk(cache, batch, mask, bb.input_keys, compute, h)
            feats = [h if real is None else h * real] + feats
        x = self.mtsa(feats)                                   # X̃: B×K×D, the only graph so far
        for i in range(self.num_early, bb.num_layers):
            x = bb.run_block(i, x, ctx)                        # frozen weights, gradient flows through
        h = bb.finish(x, ctx)
        return h if self.objective == "causal-lm" else bb.pool(h, ctx)

    def _t5_features(self, batch):
        bb = self.backbone
        enc, dec = bb.model.encoder, bb.model.decoder
        with torch.no_grad(), trunk_eval_mode(bb, not self.method_config.trunk_dropout):
            h, ctx = bb.embed(batch)
            enc_feats = self._early(h, ctx, bb.run_block, bb.num_layers, self.encoder_taps)
            memory = bb.finish_encoder(enc_feats[-1])          # B×Ts×D, read by the early decoder blocks
            y, dctx = bb.decoder_embed(batch, memory, ctx["token_mask"])
            dec_feats = self._early(y, dctx, bb.run_decoder_block, self.num_early, self.taps)
        # The encoder MTSA output is the memory of the late decoder block(s) only.
        dctx["memory"] = enc.dropout(self.encoder_side_norm(self.encoder_mtsa(enc_feats)))   # B×Ts×D
        x = self.mtsa(dec_feats)                               # B×Tt×D
        for i in range(self.num_early, len(bb.decoder_blocks)):
            x = bb.run_decoder_block(i, x, dctx)
        return bb.pool(dec.dropout(self.side_norm(x)), ctx)   # B×D


@dataclass
class SHERLConfig(TrunkCacheOptions, MethodConfig):
    """SHERL (Diao et al., ECCV 2024): frozen early layers without a graph, a multi-tiered sensing adapter
    over their outputs, and the last pretrained layer(s) as a frozen late route.

    tap_storage: how each projection P_l keeps its frozen input F_l for the weight gradient ("full", "bf16",
    "int8"; methods/common/compact_linear.py). trunk_dropout: the early route runs in the module's train
    mode (default, as the paper); false runs it in eval mode, deterministic, as cache_trunk needs on a
    backbone with dropout. cache_*: the trunk cache of the early route (methods/common/trunk_cache.py;
    bert, vit, llama)."""
    name = "sherl"
    model_class = SHERLModel
    families = ("bert", "vit", "t5", "llama")
    default_lr = 5e-4
    r: int = 4                          # side width d = hidden_size // r
    late_layers: int = 1                # frozen blocks at the end that gradient flows through
    gate_init: float = 0.0              # γ at init; tanh(0) = 0 keeps the gate closed (the paper's start)
    temperature: float = 0.1            # τ in tanh(γ/τ)
    projection: str = "auto"            # P_l: "gated" | "linear-ln" | "auto" (gated on T5, else linear-ln)
    restore: str = "linear"             # U: "linear" | "linear-ln"
    drop_every: Optional[int] = None    # skip outputs of blocks i % k == 0; None: 4 on T5, 0 (keep all) else
    tap_storage: str = "full"           # saved F_l of each P_l: "full" | "bf16" | "int8"
    trunk_dropout: bool = True          # early route in the module's train mode (false: eval mode)

    def validate(self):
        check(self.r >= 1, f"sherl.r must be a positive integer (side width = hidden_size // r), got {self.r}")
        check(self.late_layers >= 1, f"sherl.late_layers must be >= 1, got {self.late_layers}")
        check(self.temperature > 0, f"sherl.temperature must be > 0, got {self.temperature}")
        check(self.projection in PROJECTIONS,
              f"sherl.projection must be one of {', '.join(PROJECTIONS)}, got {self.projection!r}")
        check(self.restore in RESTORES, f"sherl.restore must be one of {', '.join(RESTORES)}, got {self.restore!r}")
        check(self.drop_every is None or self.drop_every >= 0,
              f"sherl.drop_every must be None or >= 0 (0 keeps every layer), got {self.drop_every}")
        check(self.tap_storage in TAP_STORAGES,
              f"sherl.tap_storage must be one of {', '.join(TAP_STORAGES)}, got {self.tap_storage!r}")
        self.validate_trunk_cache()


CONFIGS = [SHERLConfig]

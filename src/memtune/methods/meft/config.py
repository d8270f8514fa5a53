"""Options of MEFT (Liao et al., 2023): reversible adapters in three variants.

Not to be confused with "MEFT: Memory-Efficient Fine-Tuning through Sparse Adapter" (Hao et al., 2024),
a different method; this package also exports the explicit alias `ReversibleAdapterConfig`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

from ..base import ConfigError, MethodConfig, check

# Paper/code factor pairs per variant: (λ, β, swap). The small factor keeps the PLM's starting point.
VARIANTS: dict[int, tuple[float, float, bool]] = {1: (0.1, 1.0, True), 2: (1.0, 0.1, True), 3: (0.1, 0.1, False)}
READOUTS = ("auto", "mean", "plm")
COUPLINGS = ("auto", "paper", "difference")


@dataclass
class MEFTConfig(MethodConfig):
    """MEFT (Liao et al., 2023): a two-stream reversible network built from the frozen PLM plus adapters.

    Layer n maps (x¹, x²) to y¹ = λ·x¹ + F_n(x²), y² = β·x² + G_n(y¹), swapping the pair for MEFT1/2;
    the backward recomputes each layer's inputs from its outputs instead of storing activations.

    variant            1: F = PLM layer (+FFN adapter), G = adapter; 2: F = adapter, G = PLM layer
                       (+FFN adapter); 3: F = attention sub-layer (+attention adapter), G = FFN sub-layer
                       (+FFN adapter).
    bottleneck         adapter width b (two adapters per layer: 2·(2·d·b + b + d) parameters).
    lam, beta          coupling factors; None takes the variant's pair from the released code (0.1/1, 1/0.1,
                       0.1/0.1). The paper asks for "→ 0"; 0.1 trades the starting point against the
                       inverse, which divides by them.
    reversible_layers  how many adapted layers, from the bottom, run reversibly (None: all); the layers above
                       use the same coupling with ordinary autograd (the paper's "setting 1"). 0 is the
                       paper's "vanilla gradient" control: the same network, ordinary autograd.
                       Encoder-decoders: per stack, the lowest this many of the encoder's adapted layers and
                       of the decoder's layers (at most each stack's count).
    frozen_layers      the paper's "setting 3": this many lowest layers run as the plain PLM without a graph
                       and without adapters; the streams start above them. Which setting the paper used per
                       model is not known; both are plain options here. Encoder-decoders: the encoder's
                       lowest layers only. Every decoder layer is adapted and on the graph: it reads the
                       memory, which carries the encoder adapters' gradient, so none can run graph-free.
    tolerance          error budget of the reversible span (beyond the paper), relative: every layer's
                       recomputed inputs (‖x_rec − x‖/‖x‖ per stream) and every adapter tensor's gradient
                       (against ordinary autograd) on the calibration batch. 1e-3 is far below the noise
                       of SGD on a batch, yet 10³ above float32 rounding, so segments stay several layers
                       long where the layers allow it (measured: MiniLM 2-4 segments of 6 layers,
                       SmolLM2-135M 13 segments of 30 layers for MEFT1 in float32). Under bf16/fp16 autocast
                       the gradient limit rises to twice what single-layer segments reach (the precision's
                       floor, ~3e-3 on the tiny BERT), since no recomputation does better there.
    segment_layers     reversible layers per segment; segments are separated by stored B×T×2d states, so the
                       inversion error cannot compound beyond a segment. None (default): chosen on the first
                       training batch from the measured error (`calibrate.py`), variable length per segment.
                       Encoder-decoders: per stack (the decoder's segments are chosen and measured on its own
                       streams, with the memory of the encoder's current adapters).
    float64_streams    keep the two streams and the coupling arithmetic in float64 while F and G run in the
                       model's dtype: the inversion loses ~1e-16 instead of ~1e-7 per layer until a rounding
                       of the model's dtype flips, so segments get longer (SmolLM2 MEFT1: 5 instead of 13)
                       at 8 instead of 4 bytes per stored element.
    adapter_dropout    dropout inside the adapters; None: the PLM's hidden dropout (0 for Llama).
    adapter_norm       LayerNorm on the input of the MEFT1/2 reversible adapter (off in the paper's code).
    init_std           adapter weights ~ N(0, init_std²), biases 0 (paper, Fig. 4): not zero, so the start is
                       kept only approximately.
    readout            "mean": (x¹ + x²)/2 (the paper's classification read-out); "plm": the PLM-carrying
                       stream plus s·(other stream), s a learnable scalar starting at 0 (RevLLaMA's; the
                       paper's OPT read-out is not published); "auto": mean for classification, plm for a
                       causal LM (whose frozen LM head needs the PLM's hidden state).
    coupling           "paper": y¹ = λ·x¹ + F(x²) as above. "difference" (beyond the paper): the sub-networks
                       that contain a PLM residual subtract factor·input, i.e. y¹ = λ·(x¹ − x²) + F(x²) (and
                       likewise for G with β): in a pre-norm residual stream the paper's λ·x¹ term compounds
                       layer after layer (the stream grows by ~(1 + λ) per layer) while the difference of two
                       consecutive stream states is one residual branch. Measured on SmolLM2-135M, LM loss at
                       init 5.00 for the PLM: paper coupling 10.9 (MEFT1) / 24.3 (MEFT3), difference 5.10 /
                       4.94. Invertibility is unchanged (F just has an extra linear term). "auto": paper for
                       post-LN blocks (BERT: the LayerNorm bounds the term), difference for pre-norm ones (ViT,
                       Llama).
    """

    name = "meft"
    # Encoder-decoders need "decoder_sublayers" as well (`check_family`): the decoder is a second stack.
    requires = ("sublayers",)
    fixed_variant: ClassVar[Optional[int]] = None

    variant: int = 1
    bottleneck: int = 8
    lam: Optional[float] = None
    beta: Optional[float] = None
    reversible_layers: Optional[int] = None
    frozen_layers: int = 0
    tolerance: float = 1e-3
    segment_layers: Optional[int] = None
    float64_streams: bool = False
    adapter_dropout: Optional[float] = None
    adapter_norm: bool = False
    init_std: float = 0.02
    readout: str = "auto"
    coupling: str = "auto"

    def validate(self):
        n = self.name
        check(self.variant in VARIANTS, f"{n}.variant must be 1, 2 or 3, got {self.variant}")
        if self.fixed_variant is not None:
            check(self.variant == self.fixed_variant,
                  f"{n}.variant is {self.fixed_variant} for method {n!r}, got {self.variant}; "
                  f"use method 'meft' (or 'meft{self.variant}') to pick another variant")
        check(self.bottleneck >= 1, f"{n}.bottleneck must be a positive integer, got {self.bottleneck}")
        for field in ("lam", "beta"):
            v = getattr(self, field)
            check(v is None or (math.isfinite(v) and v >= 0),
                  f"{n}.{field} must be a finite number >= 0 (or none for the variant's default), got {v}")
        check(self.reversible_layers is None or self.reversible_layers >= 0,
              f"{n}.reversible_layers must be >= 0 or none (all), got {self.reversible_layers}")
        if self.reversible_layers != 0:
            check(self.factors[0] > 0 and self.factors[1] > 0,
                  f"{n}: reversible layers divide by lam and beta, so both must be > 0 "
                  f"(got lam={self.factors[0]}, beta={self.factors[1]}); "
                  "use reversible_layers=0 for a forward-only check with a zero factor")
        check(self.frozen_layers >= 0, f"{n}.frozen_layers must be >= 0, got {self.frozen_layers}")
        check(math.isfinite(self.tolerance) and self.tolerance > 0,
              f"{n}.tolerance must be a positive number, got {self.tolerance}")
        check(self.segment_layers is None or self.segment_layers >= 1,
              f"{n}.segment_layers must be >= 1 or none (automatic), got {self.segment_layers}")
        check(self.adapter_dropout is None or 0 <= self.adapter_dropout < 1,
              f"{n}.adapter_dropout must be in [0, 1) or none (the PLM's hidden dropout), got {self.adapter_dropout}")
        check(not self.adapter_norm or self.variant in (1, 2),
              f"{n}.adapter_norm applies to the reversible adapter of variants 1 and 2, not variant {self.variant}")
        check(self.init_std >= 0, f"{n}.init_std must be >= 0, got {self.init_std}")
        check(self.readout in READOUTS, f"{n}.readout must be one of {', '.join(READOUTS)}, got {self.readout!r}")
        check(self.coupling in COUPLINGS,
              f"{n}.coupling must be one of {', '.join(COUPLINGS)}, got {self.coupling!r}")

    @classmethod
    def supported_families(cls) -> list[str]:
        """Families with the sub-layers, encoder-decoders only where they also give the decoder's."""
        from ...backbones import FAMILIES

        need = set(cls.requires)
        return list(dict.fromkeys(c.family for c in FAMILIES.values() if need <= c.capabilities and (
            not c.is_encoder_decoder or "decoder_sublayers" in c.capabilities)))

    def check_family(self, backbone) -> None:
        super().check_family(backbone)
        if backbone.is_encoder_decoder and "decoder_sublayers" not in backbone.capabilities:
            raise ConfigError(f"method {self.name!r} on an encoder-decoder couples the decoder too and needs its "
                              f"sub-layers (capability 'decoder_sublayers'), which the {backbone.family} family does "
                              f"not declare; supported families: {', '.join(self.supported_families())}")

    @property
    def factors(self) -> tuple[float, float]:
        """(λ, β) after applying the variant's defaults."""
        lam, beta, _ = VARIANTS[self.variant]
        return (lam if self.lam is None else self.lam, beta if self.beta is None else self.beta)

    @property
    def swap(self) -> bool:
        return VARIANTS[self.variant][2]


@dataclass
class MEFT1Config(MEFTConfig):
    """MEFT1: F = PLM layer with FFN adapter, G = adapter; λ = 0.1, β = 1, streams swapped."""
    name = "meft1"
    fixed_variant = 1
    variant: int = 1


@dataclass
class MEFT2Config(MEFTConfig):
    """MEFT2: F = adapter, G = PLM layer with FFN adapter; λ = 1, β = 0.1, streams swapped."""
    name = "meft2"
    fixed_variant = 2
    variant: int = 2


@dataclass
class MEFT3Config(MEFTConfig):
    """MEFT3: F = attention sub-layer with adapter, G = FFN sub-layer with adapter; λ = β = 0.1, no swap."""
    name = "meft3"
    fixed_variant = 3
    variant: int = 3


ReversibleAdapterConfig = MEFTConfig

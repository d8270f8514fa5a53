"""The trainable visual embedding of image-text compositions (docs/methods/vl.md): frozen visual tokens → the
width of the network that reads them.

    e_v[k] = Norm(W_v·v[k] + b_v) + t_v + p_(k mod V) + E_img[k div V]
             v: B×(n·V)×d_v (backbone.visual_tokens, n = 1 or 2 images) → e_v: B×(n·V)×width

t_v is one learned type vector shared by the visual tokens, p_k a learned code per visual index k < V within an
image (row-major over the pooled grid; both images of a two-image example share them), E_img ∈ R^{2×width} the
trainable image-order embedding (image ids [0]×V + [1]×V, NLVR²; specs/vl.md §2.1). E_img starts at zero, so a
one-image input (id 0 only) gives bit for bit what it gave before E_img existed, and the two images of a pair
are told apart by order only once E_img[0] ≠ E_img[1]. Norm is an RMS norm (T5's norm type, as the official
CLIP-T5 visual MLP) or a LayerNorm (BERT-like text families).

Two readers use it:
- LST-VL (mode A, `methods/lst`): the side network's input (see `methods/lst/visual.py` for the factorised
  form, width = d read through W0, and the parameter count against the official MLP);
- the prefix of mode B (`backbones/image_text.py`): width = d, prepended to the text embedding output, for the
  methods that run the text backbone's own forward (full, LoRA, adapters, ...); frozen for SHERL-VL
  (`draw_fixed_`, then its norm scaled to the text by the composition);
- SHERL-VL's side projection P_s (`methods/sherl/visual.py`): width = D, added at the visual positions of X̃,
  starting at exactly 0 (`zero_output_`).

Trainable parameters: (d_v + 5 + V)·width with the RMS norm (W_v and b_v, the norm's weight, t_v, the 2 rows of
E_img, V position codes), one width more with a LayerNorm (its bias).
"""
from __future__ import annotations

import torch
from torch import nn

NORMS = ("rms", "layer")
IMAGES = 2               # rows of E_img: the most images an example may have (NLVR²-style pairs)
POSITION_CODE_STD = 0.02


class VisualEmbedding(nn.Module):
    def __init__(self, visual_width: int, width: int, tokens: int, factorised: bool = True, eps: float = 1e-6,
                 norm: str = "rms", what: str = "visual embedding"):
        super().__init__()
        for name, value in (("visual_width", visual_width), ("width", width), ("tokens", tokens)):
            if value < 1:
                raise ValueError(f"{what}: {name} must be >= 1, got {value}")
        if norm not in NORMS:
            raise ValueError(f"{what}: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self.what = what
        self.factorised = factorised
        self.tokens = tokens
        self.proj = nn.Linear(visual_width, width)                  # W_v, b_v: d_v → width
        self.norm = nn.RMSNorm(width, eps=eps) if norm == "rms" else nn.LayerNorm(width, eps=eps)
        # t_v starts at 0; the codes start as small random rows, N(0, 0.02²) as BERT's learned position
        # embeddings: positions are told apart from the first step, and the content Norm(W_v·v) (RMS 1) is most
        # of what the reader sees at init, rather than half of it as with unit-scale codes (the size of the
        # official frozen embedding rows). Measured (benchmarks/notes.md, digits-vqa): no difference where
        # training is stable, a help near the edge of it.
        self.type_code = nn.Parameter(torch.zeros(width))
        self.position_codes = nn.Parameter(torch.randn(tokens, width) * POSITION_CODE_STD)
        # E_img: one row per image of a two-image example (ids [0]×V + [1]×V); zero, so one-image outputs are
        # unchanged and the draw of everything else is too (zeros consume no random numbers).
        self.image_order = nn.Parameter(torch.zeros(IMAGES, width))

    @staticmethod
    def parameter_count(visual_width: int, width: int, tokens: int, norm: str = "rms") -> int:
        """(d_v + 5 + V)·width: W_v (d_v·width), b_v, the norm weight, t_v (width each), E_img (2 rows), V codes;
        + width for a LayerNorm's bias."""
        return (visual_width + 3 + IMAGES + tokens + (norm == "layer")) * width

    @torch.no_grad()
    def draw_fixed_(self, seed: int = 0) -> "VisualEmbedding":
        """A reproducible draw, for a frozen embedding that no checkpoint holds: W_v ~ N(0, 1/d_v) from a CPU
        generator seeded with `seed` (the global RNG is untouched), b_v = t_v = p_k = E_img = 0. The norm is left
        to the caller (the composition scales it to the text embedding output)."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        d_v = self.proj.in_features
        self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=g, device="cpu") / d_v ** 0.5)
        for p in (self.proj.bias, self.type_code, self.position_codes, self.image_order):
            p.zero_()
        return self

    @torch.no_grad()
    def zero_output_(self) -> "VisualEmbedding":
        """Output exactly 0 for every input: the norm's gain (and bias), both codes and E_img at 0. W_v keeps its
        draw, so it gets a gradient once the gain moves away from 0."""
        self.norm.weight.zero_()
        for p in (getattr(self.norm, "bias", None), self.type_code, self.position_codes, self.image_order):
            if p is not None:
                p.zero_()
        return self

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """v: B×(n·V)×d_v (frozen; n = 1 image, or 2: image 0's V tokens, then image 1's) → e_v: B×(n·V)×width."""
        V = self.tokens
        if v.shape[1] not in (V, IMAGES * V):
            raise ValueError(f"{self.what}: got {v.shape[1]} visual tokens per example, built for {V} per image "
                             f"(the composition's grid²): {V} for one image or {IMAGES * V} for two")
        n = v.shape[1] // V
        ids = torch.arange(n, device=v.device).repeat_interleave(V)          # n·V image ids: [0]×V (+ [1]×V)
        # p_k repeats per image (k < V); E_img[id] is added last, so at E_img = 0 a one-image output is bit for
        # bit the sum without it.
        return self.norm(self.proj(v)) + self.type_code + self.position_codes.repeat(n, 1) + self.image_order[ids]

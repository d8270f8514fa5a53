"""SHERL-VL on an image-text composition (docs/methods/vl.md §4 "SHERL in mode B", §3.1's CLIP-ViL row).

The released CLIP-ViL fork runs SHERL on a single-stream transformer whose input is [word embeddings ; visual
tokens] through a frozen, pretrained visual projection. memtune's compositions (backbones/image_text.py) have no
pretrained projection, so the prefix is a frozen random one, RMS-matched to the text embedding output:

    v   = backbone.visual_tokens(batch)              B×V×d_v      frozen vision encoder, no autograd
    F_0 = [P_b(v) ; text embedding output]           B×(V+T)×D    P_b frozen (add_visual_prefix(trainable=False))
    F_l = φ_l(F_{l-1}),  l = 1..N-1                  B×(V+T)×D    early route over all V+T positions, no graph
    X̃  = MTSA(F_0..F_{N-1}) + [P_s(v) ; 0]          B×(V+T)×D    P_s trainable, added at the V visual positions
    Y   = φ_N(X̃) → the backbone's pooling (mean over the V+T real positions) → head

Encoder–decoders (T5): F_0 is the encoder input; all encoder blocks run without a graph, and [P_s(v) ; 0] is
added to the encoder MTSA's output (before its side norm), the memory of the late decoder block(s). Gradient
enters the backbone only at φ_N (T5: the late decoder block(s)), exactly as in text-only SHERL.

Choices where the description leaves room (tested in tests/methods/test_sherl_vl.py):
- P_b frozen, not trainable: a trainable P_b would need the early route on the backprop path (vl.md §4 "Why").
- P_s = the shared VisualEmbedding (d_v → D: Linear, the text family's norm, a type vector, per-index codes)
  with its output exactly 0 at init (norm gain, bias and both codes 0; `zero_output_`), so SHERL-VL starts as
  SHERL over the frozen prefix: with U = 0 and γ = 10 it reproduces the frozen composition.
- The trunk cache keys each example on its text and its pixel values. The features span V+T positions, so the
  checksum reads the token inputs left-padded by V (`checksum_view`): an example then replays into batches of
  any padded text length, as on text-only backbones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backbones.visual_embedding import VisualEmbedding


class SideVisualProjection(VisualEmbedding):
    """P_s: frozen visual tokens B×V×d_v → B×V×D, exactly 0 at init; trains with the MTSA."""

    def __init__(self, backbone):
        super().__init__(backbone.visual_width, backbone.hidden_size, backbone.visual_length,
                         eps=backbone.prefix_eps, norm=backbone.prefix_norm, what="sherl side visual projection")
        self.zero_output_()

    def add_at_visual_positions(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """x: B×(V+T)×D (the prefix first) → x + [P_s(v) ; 0], v = ctx["visual_tokens"] from the backbone's embed."""
        e = self(ctx["visual_tokens"]).to(x.dtype)                          # B×V×D
        return x + F.pad(e, (0, 0, 0, x.shape[1] - e.shape[1]))              # zeros at the T text positions


def visual_side_projection(backbone) -> SideVisualProjection | None:
    """On a composition: give the backbone its frozen prefix and return a new P_s; None on other backbones."""
    if "visual_side_tokens" not in backbone.capabilities:
        return None
    backbone.add_visual_prefix(trainable=False)
    return SideVisualProjection(backbone)


def checksum_view(batch: dict, visual_length: int, keys: tuple[str, ...]) -> dict:
    """The batch as the trunk cache checksums it under the B×(V+T) token mask: every token input among `keys`
    (B×T) left-padded with V zeros, so the mask's real positions pick exactly the real tokens; pixel_values as
    B×1×3×S×S, so that its rows are never taken for token rows (their first axis, 1, is never V+T)."""
    view = dict(batch)
    ids = batch["input_ids"]
    B, T = ids.shape
    for k in keys:
        x = batch.get(k)
        if k == "pixel_values" and torch.is_tensor(x):
            view[k] = x.unsqueeze(1)
        elif torch.is_tensor(x) and x.dim() >= 2 and tuple(x.shape[:2]) == (B, T):
            view[k] = torch.cat([x.new_zeros(B, visual_length, *x.shape[2:]), x], dim=1)
    return view

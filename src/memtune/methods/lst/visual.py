"""LST-VL's trainable visual embedding (docs/methods/vl.md §2.1, §4): frozen visual tokens → side-network inputs.

    e_v[k] = Norm(W_v·v[k] + b_v) + t_v + p_(k mod V) + E_img[k div V]
             v: B×(n·V)×d_v (backbone.visual_tokens, n = 1 or 2 images) → e_v: B×(n·V)×width

t_v is one learned type vector shared by the visual tokens, p_k a learned code per visual index k < V within an
image (row-major over the pooled grid; the two images of an NLVR²-style pair share them), E_img the trainable
image-order embedding (2 rows, ids [0]×V + [1]×V, zero at init: one-image outputs are as without it); Norm is
an RMS norm (T5's norm type, as the official CLIP-T5 visual MLP).

Two images: the side sequence is [text ; image 0 ; image 1], B×(T+2V)×d' (T+72 at grid 6); the ladders are zero
at all 2V visual positions and the T5 side relative bias stays on the text-text block.

factorised=True (default, the official form): width = d, the backbone width, and the side reads
s = W0·drop([E_x ; e_v]): the side's own W0 maps text and visual tokens alike, so the visual path is
W0∘VisualEmbedding. factorised=False: width = d', and e_v joins the side sequence directly,
s = [W0·drop(E_x) ; drop(e_v)].

Trainable parameters: (d_v + 5 + V)·width (W_v and b_v, the norm's weight, t_v, E_img's 2 rows, V position
codes). The official MLP has (f + 11)·d = 1,581,312 at f = 2048, d = 768: its box branch (7d) is a constant at
zero boxes, its image-order table has 2 rows (2d, as E_img here), and its per-index codes are frozen embedding
rows; here the constant is the one vector t_v (d) and the codes train (V·d), so at V = 36 this is
(f + 41)·d = 1,604,352 = 1,581,312 + 30d.

The class itself is shared with the prefix of image-text compositions: `backbones/visual_embedding.py`.
"""
from __future__ import annotations

from ...backbones.visual_embedding import VisualEmbedding


class VisualSideEmbedding(VisualEmbedding):
    """The shared visual embedding with LST's name in its messages (RMS norm, as the official CLIP-T5 MLP)."""

    def __init__(self, visual_width: int, width: int, tokens: int, factorised: bool = True, eps: float = 1e-6):
        super().__init__(visual_width, width, tokens, factorised, eps, norm="rms", what="lst visual embedding")

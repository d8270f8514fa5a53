"""Image + text composition: a frozen vision backbone beside a frozen text backbone (docs/methods/vl.md §4).

    model = compose(load_model("dinov2-s"), load_model("t5-base"), grid=6)    # or two Hugging Face modules
    lst = memtune.wrap(model, "lst")                                          # LST-VL, text-to-text
    lst = memtune.wrap(compose(vision, bert), "lst", num_labels=2)            # BERT-like: classification

The composed backbone *is* the text backbone (a subclass of its family's class over the same text module),
so every method runs the text trunk exactly as on the plain text model; the image reaches nothing in it.
On top it declares the capability "visual_side_tokens" and offers

    v = backbone.visual_tokens(batch)        # B×V×d_v from batch["pixel_values"], V = grid², no autograd
                                             # B×2V×d_v with batch["pixel_values_2"] too (two images, NLVR²)

the vision backbone's patch-grid tokens after its final norm, adaptive-max-pooled (no parameters) from its
rows×cols patch grid to grid×grid (LST's CLIP-T5 pools to 6×6 = 36 tokens). A method that feeds them to a side
network appends them after the text positions of its side sequence; `side_context` then extends the side
padding mask with ones, and the T5 form keeps the side relative position bias on the text-text block only.

**Mode B, the visual prefix** (docs/methods/vl.md §4), for the methods that run the text backbone's own forward (full,
LoRA, IA3, adapters, BitFit: `MemtuneModel.visual_prefix`) and, frozen, for SHERL:

    backbone.add_visual_prefix()              # done by MemtuneModel for those methods; LST never calls it
    backbone.add_visual_prefix(trainable=False)   # SHERL-VL: a frozen prefix (methods/sherl/visual.py)
    h, ctx = backbone.embed(batch)            # h: B×(V+T)×d = [e_v ; text embedding output]

e_v = VisualEmbedding(v) (d_v → d, Linear + the text family's norm + a type vector + per-index codes;
`visual_embedding.py`), after the embedding dropout; ctx "token_mask" becomes [ones(V) ; text mask] and the
attention mask is rebuilt over V+T, so T5's encoder and decoder cross-attention and BERT's mean pooling see
the visual positions; ctx "visual_tokens" keeps v (B×V×d_v) for a method that reads it again (SHERL's P_s).
T5: the prefix is the encoder input (embed_tokens output); BERT: it follows the embeddings module (positions,
token types and its LayerNorm apply to the text only).

Who trains what: the vision encoder never trains (`never_trainable`, it runs without autograd). A trainable
prefix (the default) trains under every method, as the official VL code trains its visual embedding; a frozen
one never does. The rule is the instance's `always_trainable` / `never_trainable`, set by `add_visual_prefix`
and honoured by `MemtuneModel.trains`.

The frozen prefix (SHERL: a trainable P_b feeding block 1 would put every frozen block on the backprop path) is
random but RMS-matched to the text embedding output, and seeded, so that a checkpoint (the trainable tensors
only) rebuilds the same one on load: W_v ~ N(0, 1/d_v) from a generator of fixed seed, b_v = t_v = p_k = 0
(no per-index code: the vision encoder's tokens carry their own positions), and the norm scaled to the text:
- T5 (RMS norm; its encoder input is the raw embedding row): gain c = RMS of the embedding table
  (sqrt(mean(E²)) over all its entries), so every prefix row has RMS c·sqrt(ms/(ms + eps)) ≈ c;
- BERT-like (LayerNorm; the text rows are the output of the embeddings' LayerNorm): the prefix LayerNorm takes
  that LayerNorm's γ and β, so prefix and text rows are standardised alike and share its per-feature affine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from .base import Backbone, UnsupportedModel
from .bert import BertLikeBackbone
from .t5 import T5Backbone
from .visual_embedding import VisualEmbedding

# The batch keys of an example's images: the first, and the second of a two-image example (NLVR²-style).
IMAGE_KEYS = ("pixel_values", "pixel_values_2")


def _check_images(images) -> None:
    if images not in (1, 2):
        raise ValueError(f"images per example must be 1 or 2 (pixel_values, pixel_values_2), got {images!r}")


# Tiny compositions for tests and smoke runs: alias → (vision alias, text alias) of `memtune.models`.
TINY_COMPOSITIONS = {"tiny-vl-t5": ("tiny-vit", "tiny-t5"), "tiny-vl-bert": ("tiny-vit", "tiny-bert")}


@dataclass
class ImageTextConfig:
    """What `memtune.wrap` and checkpoints read off a composed model, plus the two parts' own configs."""
    vision_config: Any
    text_config: Any
    grid: int = 6                    # visual tokens per side of the pooled patch grid (V = grid²)
    _name_or_path: str = ""
    model_type: str = field(default="image_text", init=False)

    def __post_init__(self):
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise ValueError(f"compose: grid must be a positive integer (visual tokens per side of the pooled "
                             f"patch grid, e.g. 6 for 36 tokens); got {self.grid!r}")


class ImageTextModel(nn.Module):
    """The two frozen Hugging Face modules of a composition; `backbones.backbone_for` asks it for its adapter."""

    def __init__(self, vision_model: nn.Module, text_model: nn.Module, grid: int = 6, name: str = ""):
        super().__init__()
        self.vision_model = vision_model
        self.text_model = text_model
        self.config = ImageTextConfig(vision_model.config, text_model.config, grid, name)

    def memtune_backbone(self) -> Backbone:
        """The composed backbone over these modules (the text family's adapter with visual tokens)."""
        return composed_family(self.config)(self)


def composed_family(config: ImageTextConfig) -> type["ImageTextBackbone"]:
    """The composed backbone class of a composition's config: its text family's (`backbones.family_class`)."""
    text_type = getattr(config.text_config, "model_type", None)
    if text_type not in COMPOSED_FAMILIES:
        raise UnsupportedModel(f"compose: text model type {text_type!r} has no image-text composition; "
                               f"supported text model types: {', '.join(sorted(COMPOSED_FAMILIES))}")
    return COMPOSED_FAMILIES[text_type]


def _module_and_name(model) -> tuple[nn.Module, str]:
    """A Hugging Face module and its name from a module or a `memtune.models.LoadedModel`."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(model, "name"):        # a LoadedModel
        return inner, model.name
    if not isinstance(model, nn.Module):
        raise TypeError(f"compose: expected a Hugging Face module or a memtune LoadedModel, got {type(model).__name__}")
    return model, getattr(model.config, "_name_or_path", "") or model.config.model_type


def compose(vision_model, text_model, grid: int = 6) -> ImageTextModel:
    """A frozen vision model (an image family with a patch grid: ViT, DINOv2) and a frozen text model (T5)
    as one model for `memtune.wrap`. Both may be Hugging Face modules or `LoadedModel`s; grid: the pooled
    visual grid per side (V = grid² visual tokens)."""
    vision, vision_name = _module_and_name(vision_model)
    text, text_name = _module_and_name(text_model)
    return ImageTextModel(vision, text, grid, f"{vision_name}+{text_name}")


class ImageTextBackbone(Backbone):
    """Mixin of the composed backbones: put it before the text family's class (`T5ImageTextBackbone`).

    The protocol (embed, blocks, decoder stack, finish, pool, side hooks) is the text family's, over the text
    module (`self.model`); the vision backbone is `self.vision`, read only by `visual_tokens`."""

    # Parameter-name prefixes (relative to the backbone) that override every method's trainable rule
    # (`MemtuneModel.trains`): the vision encoder never trains (it runs without autograd). `add_visual_prefix`
    # sets the instance's own: a trainable prefix always trains (the official VL code trains its visual
    # embedding under every method), a frozen one never does.
    always_trainable: ClassVar[tuple[str, ...]] = ()
    never_trainable: ClassVar[tuple[str, ...]] = ("vision.",)
    prefix_seed: ClassVar[int] = 0              # the frozen prefix's draw (reproducible without a checkpoint)
    prefix_norm: ClassVar[str] = "rms"          # the text family's norm type, for the prefix's Norm

    def __init__(self, composed: ImageTextModel):
        from . import backbone_for

        super().__init__(composed.text_model)
        vision = backbone_for(composed.vision_model)
        if vision.modality != "image" or vision.token_layout != "grid":
            raise UnsupportedModel(f"compose: the vision model must be an image family with a patch grid "
                                   f"(ViT, DINOv2); {vision.family} has token layout {vision.token_layout!r}")
        self.vision = vision
        self.grid = composed.config.grid
        self.visual_prefix: VisualEmbedding | None = None      # mode B; see add_visual_prefix
        self.visual_prefix_trainable: bool | None = None        # None until a prefix is added

    @property
    def prefix_eps(self) -> float:
        """The epsilon of the text family's norms, used by the prefix's norm."""
        raise NotImplementedError

    @property
    def prefix_mask_config(self):
        """The config the text family builds its encoder attention mask from."""
        raise NotImplementedError

    def add_visual_prefix(self, trainable: bool = True) -> None:
        """Mode B: from now on `embed` returns [e_v ; text] (see the module docstring). trainable=False builds the
        frozen, seeded, RMS-matched prefix (SHERL-VL) and keeps it out of every trainable set. Idempotent for
        the same `trainable`; asking for the other kind once a prefix exists is an error."""
        if self.visual_prefix is not None:
            if trainable != self.visual_prefix_trainable:
                have, want = ("trainable", "frozen") if self.visual_prefix_trainable else ("frozen", "trainable")
                raise ValueError(f"this composition already has a {have} visual prefix; a {want} one cannot be "
                                 "added to it (wrap a fresh backbone)")
            return
        ref = next(self.model.parameters())
        prefix = VisualEmbedding(self.visual_width, self.hidden_size, self.visual_length, eps=self.prefix_eps,
                                 norm=self.prefix_norm, what="visual prefix")
        if not trainable:
            prefix.draw_fixed_(self.prefix_seed)
        self.visual_prefix = prefix.to(ref.device, ref.dtype)
        self.visual_prefix_trainable = trainable
        if trainable:
            self.always_trainable = ("visual_prefix.",)
        else:
            with torch.no_grad():
                self.match_text_scale(self.visual_prefix.norm)
            self.never_trainable = (*type(self).never_trainable, "visual_prefix.")

    def match_text_scale(self, norm: nn.Module) -> None:
        """Set the frozen prefix's norm so that its rows have the scale of the text embedding output."""
        raise NotImplementedError

    def embed(self, batch):
        """The text family's embed; with the visual prefix: h B×(V+T)×d = [drop(e_v) ; h_text], the token mask
        [ones(V) ; text mask] (B×(V+T)) and the attention mask rebuilt over it."""
        h, ctx = super().embed(batch)                                        # B×T×d, the family's ctx
        if self.visual_prefix is None:
            return h, ctx
        v = self.visual_tokens(batch)                                        # B×V×d_v
        e_v = self.visual_prefix(v).to(h.dtype)                              # B×V×d; grad reaches the prefix only
        e_v = F.dropout(e_v, self.hidden_dropout, self.training)
        text_mask = ctx["token_mask"]                                        # B×T
        mask = torch.cat([text_mask.new_ones(text_mask.shape[0], e_v.shape[1]), text_mask], dim=1)   # B×(V+T)
        h = torch.cat([e_v, h], dim=1)
        ctx["token_mask"] = mask
        ctx["attn_mask"] = create_bidirectional_mask(config=self.prefix_mask_config, inputs_embeds=h,
                                                     attention_mask=mask)
        ctx["visual_prefix_length"] = e_v.shape[1]
        ctx["visual_tokens"] = v                                             # B×V×d_v, no graph
        return h, ctx

    @property
    def visual_width(self) -> int:
        """d_v, the width of the visual tokens."""
        return self.vision.hidden_size

    @property
    def visual_length(self) -> int:
        """V, the number of visual tokens per image (the visual embeddings' position codes p_k, k < V). An
        example with two images has 2V (`visual_images`)."""
        return self.grid * self.grid

    @staticmethod
    def visual_images(batch) -> int:
        """Images per example of a batch: 2 with pixel_values_2 (NLVR²-style pairs, VQA template B5), else 1."""
        return 2 if batch.get("pixel_values_2") is not None else 1

    @torch.no_grad()
    def visual_tokens(self, batch) -> torch.Tensor:
        """batch["pixel_values"] (B×3×S×S) → B×V×d_v: the frozen vision backbone's patch tokens after its final
        norm, max-pooled from its rows×cols grid to grid×grid (row-major order), without autograd.

        With batch["pixel_values_2"] (B×3×S×S, the second image of each example) each image is encoded and
        pooled on its own and the result is B×2V×d_v: image 0's V tokens, then image 1's (image ids [0]×V +
        [1]×V; the visual embedding adds E_img[id] and the per-image position codes p_k). Image 0's tokens
        are bit for bit the one-image result."""
        if "pixel_values" not in batch:
            raise ValueError("image-text models need pixel_values (B×3×S×S) in the batch beside the text inputs")
        first = self._pooled_grid(batch["pixel_values"])                     # B×V×d_v
        second = batch.get("pixel_values_2")
        if second is None:
            return first
        if second.shape != batch["pixel_values"].shape:
            raise ValueError(f"pixel_values_2 (the second image) has shape {tuple(second.shape)}, pixel_values "
                             f"{tuple(batch['pixel_values'].shape)}; both images must be B×3×S×S of one size")
        return torch.cat([first, self._pooled_grid(second)], dim=1)          # B×2V×d_v

    def _pooled_grid(self, pixel_values) -> torch.Tensor:
        """One image per example, B×3×S×S → B×V×d_v (see visual_tokens)."""
        v = self.vision
        px = pixel_values.to(next(v.parameters()).dtype)
        h, ctx = v.embed({"pixel_values": px})
        h, _ = v.forward_intermediates(h, ctx, stop=v.num_layers)
        patches = v.grid_tokens(v.finish(h, ctx), ctx)                       # B×(rows·cols)×d_v
        rows, cols = ctx["grid"]
        B, _, d_v = patches.shape
        grid = patches.transpose(1, 2).reshape(B, d_v, rows, cols)           # B×d_v×rows×cols
        pooled = F.adaptive_max_pool2d(grid, self.grid)                       # B×d_v×grid×grid
        return pooled.flatten(2).transpose(1, 2)                              # B×V×d_v

    def planning_batch(self, config, batch_size, max_length, image_size=None, dtype=torch.float32, device="meta",
                       images: int = 1, **kwargs):
        """The text family's planned inputs plus pixel_values B×3×S×S (zeros), S = image_size or the vision
        config's; images=2 adds pixel_values_2 (two-image examples: 2V visual tokens). An instance method here,
        unlike the families' class methods: the image size is the vision part's (the memory techniques call it
        on the backbone, e.g. gradient checkpointing's dry run)."""
        _check_images(images)
        batch = super().planning_batch(config, batch_size, max_length, dtype=dtype, device=device, **kwargs)
        size = image_size or self.vision.config.image_size
        for key in IMAGE_KEYS[:images]:
            batch[key] = torch.zeros(batch_size, 3, size, size, dtype=dtype, device=device)
        return batch

    def example_batch(self, batch_size, length, device=None, images: int = 1):
        """The text family's batch plus pixel_values B×3×S×S in [0, 1], S the vision config's image size;
        images=2 adds pixel_values_2, an independent draw."""
        _check_images(images)
        batch = super().example_batch(batch_size, length, device)
        size = self.vision.config.image_size
        for key in IMAGE_KEYS[:images]:
            batch[key] = torch.rand(batch_size, 3, size, size, device=device)
        return batch

    @torch.no_grad()
    def side_context(self, s, ctx, cfg, rotary=None, cache=None):
        """Side encoder context for s = [text ; visual] (B×(T+V)×d'): the text padding mask then ones at the V
        visual positions; ctx "text_length" = T marks the split for the family's bias."""
        mask = ctx["token_mask"]                                             # B×T
        extra = s.shape[1] - mask.shape[1]
        if extra <= 0:
            return super().side_context(s, ctx, cfg, rotary, cache)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=1)  # B×(T+V)
        sctx = super().side_context(s, {**ctx, "token_mask": mask}, cfg, rotary, cache)
        sctx["text_length"] = ctx["token_mask"].shape[1]
        return sctx


class T5ImageTextBackbone(ImageTextBackbone, T5Backbone):
    """T5 with visual side tokens. The side relative bias is T5's on the text-text block and 0 for every pair
    with a visual token (LST's CLIP-T5), then the padding mask is added."""
    capabilities = T5Backbone.capabilities | {"visual_side_tokens"}
    input_keys = (*T5Backbone.input_keys, *IMAGE_KEYS)

    @property
    def prefix_eps(self):
        return self.config.layer_norm_epsilon

    @property
    def prefix_mask_config(self):
        return self.model.encoder.config

    def match_text_scale(self, norm):
        """RMS gain c = sqrt(mean(E²)) of the embedding table E (the encoder's input rows are raw E rows)."""
        table = self.model.encoder.embed_tokens.weight
        norm.weight.copy_(table.float().pow(2).mean().sqrt().to(norm.weight.dtype).expand_as(norm.weight))

    def run_side_block(self, block, s, sctx):
        T = sctx.get("text_length")
        if T is not None and sctx["position_bias"] is None:       # the first side block of the side encoder
            sctx["position_bias"] = self.text_only_side_bias(block, s.shape[1], T, sctx["mask"])
        return super().run_side_block(block, s, sctx)

    @staticmethod
    def text_only_side_bias(block, length: int, text_length: int, mask) -> torch.Tensor:
        """1×H×L×L (B×H×L×L with a mask) for L = T+V: the block's relative bias over the T text positions,
        zeros wherever a visual position is involved, plus the additive mask. Keeps the graph to the bias
        table (it trains)."""
        attn = block.layer[0].SelfAttention
        if not attn.has_relative_attention_bias:
            raise UnsupportedModel("T5 side encoder: the first side block has no relative-attention table")
        extra = length - text_length
        bias = F.pad(attn.compute_bias(text_length, text_length), (0, extra, 0, extra))   # 1×H×L×L
        return bias if mask is None else bias + mask[:, :, :, :length]


class BertImageTextBackbone(ImageTextBackbone, BertLikeBackbone):
    """BERT-like encoders (absolute positions) with visual side tokens: the side attends over [text ; visual]
    with no position term at the visual positions beyond the side's own learned codes. Pooling of side
    outputs B×(T+V)×d is the mean over the real text tokens and the V visual tokens."""
    capabilities = BertLikeBackbone.capabilities | {"visual_side_tokens"}
    input_keys = (*BertLikeBackbone.input_keys, *IMAGE_KEYS)
    prefix_norm = "layer"

    @property
    def prefix_eps(self):
        return self.config.layer_norm_eps

    @property
    def prefix_mask_config(self):
        return self.config

    def match_text_scale(self, norm):
        """The embeddings' LayerNorm γ, β (the text rows are its output)."""
        ln = self.model.embeddings.LayerNorm
        norm.weight.copy_(ln.weight)
        norm.bias.copy_(ln.bias)

    def pool(self, h, ctx):
        mask = ctx["token_mask"]                                             # B×T
        extra = h.shape[1] - mask.shape[1]
        if extra > 0:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], extra)], dim=1)   # B×(T+V)
            ctx = {**ctx, "token_mask": mask}
        return super().pool(h, ctx)


# Text model type → its composed backbone class. MPNet is left out: its side blocks share the backbone's
# relative bias over the text positions, which would need the T5-like split.
COMPOSED_FAMILIES: dict[str, type[ImageTextBackbone]] = {
    "t5": T5ImageTextBackbone,
    "bert": BertImageTextBackbone, "roberta": BertImageTextBackbone, "xlm-roberta": BertImageTextBackbone,
}

"""SHERL's retrieval form (the VSE∞ fork, docs/methods/vl.md §3.1): two frozen towers, each with its own route.

    model = memtune.wrap(memtune.load_model("tiny-vl-bert"), memtune.SHERLConfig(form="retrieval"))
    emb_img = model.encode_image(pixel_values)                   # B×E, unit ℓ2 norm
    emb_txt = model.encode_text(input_ids, attention_mask)       # B×E, unit ℓ2 norm
    out = model(**batch); out.loss.backward()                   # out.logits: B×B cosine similarities

Per tower (text: the composition's BERT-like encoder; image: its ViT / DINOv2, `backbone.vision`):

    early route (torch.no_grad):  F_0 = embed(x),  F_l = φ_l(F_{l-1}),  l = 1..N-L         B×K×D each
    MTSA (trainable, mtsa.py):    X̃ = U(ReLU(g)) + tanh(γ/τ)·F_{N-L}                      B×K×D
    late route (frozen weights,   φ_{N-L+1..N}(X̃) → the family's final norm → pool       B×F
    gradient flows through it)    (text: mean over real tokens; ViT: [CLS ‖ mean of patches])
    joint projection (trainable): e = ℓ2-normalise(W·pooled + b)                          B×E   (text_fc, image_fc)

The towers meet only in S = e_img · e_txtᵀ (B×B, rows images, columns captions), the cosine similarity of
every in-batch pair; the loss reads S (diagonal: the matching pairs):

    hinge (VSE∞, default):  per image i, c_i = [m + S_ij − S_ii]₊ over captions j; per caption j,
                            c'_j = [m + S_ij − S_jj]₊ over images i; hardest negative: max over each,
                            else the sum; loss = (Σ_i c_i + Σ_j c'_j) / B                     margin m = 0.2
    infonce (CLIP4Clip):    ½ (CE(S/τ, diag) + CE(Sᵀ/τ, diag)), τ fixed or learned

The entry point is SHERL's config (`form="retrieval"`; its options in retrieval_options.py) rather than a method
of its own: the route per tower is SHERL's, only the wiring differs, and `SHERLConfig.model_class` picks the
model of the form, so `memtune.wrap`, `memtune.load` and `memtune train --method sherl --form retrieval` (set
by itself on an "image_caption" task such as digits-captions) need nothing new. Checkpoints are the usual
adapter (both MTSAs, the two projections and a learned temperature).

Choices where the description leaves room (tested in tests/methods/test_sherl_retrieval.py):
- Each tower's recipe is the one SHERL resolves for its backbone (config.RECIPES): VSE∞'s BERT text recipe
  for the text tower (d = D/2, Linear → LN P_l and U, PyTorch's init, as the released text fork); the CLIP-ViL
  recipe for the ViT tower (gated P_l, N(0, 0.02²)): the released image fork ran on a CNN whose conv/BN P_l
  and U have no ViT counterpart. Explicit options (r, projection, ...) apply to both towers.
- The released fork pools with GPO (a learned pooling); memtune keeps each family's own pooling, so that with
  the gate open and U = 0 a tower's pooled output is the frozen backbone's, a checkable starting point.
- Pairs of the same class (batch["labels"]) are not negatives of each other: the caption tasks' captions are
  class-level ("a handwritten seven"), so another image of the class is a correct match, not a mistake
  (the hardest negative would otherwise often be a true match). Without labels every off-diagonal pair is one.
- The hinge is averaged over the batch (VSE∞ sums), so the loss scale does not grow with the batch size;
  VSE∞'s first-epoch sum over all negatives is `hardest_negative=false`; the switch between the two is not
  automatic (the model does not see epochs): run a first training with false where the towers start with
  near-equal embeddings (tiny random models), since the hardest-negative loss then stays at its collapsed
  value 2·margin (tested). InfoNCE's τ is clamped to ≥ 0.01 (CLIP clamps its logit scale at 100).
- Only BERT-like text encoders (a T5 composition has no single-stack encoder route here), one-width vision
  backbones, no trunk cache (two towers with their own inputs): each refused with a ConfigError.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..base import MemtuneModel, check
from ..common.trunk_cache import trunk_eval_mode
from .model import collected_blocks
from .mtsa import MTSA

MIN_TEMPERATURE = 0.01


@dataclass
class RetrievalOutput(ModelOutput):
    """loss: the contrastive loss over the in-batch pairs; logits: B×B cosine similarities (rows images);
    image_embeds, text_embeds: B×E, unit norm."""
    loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    image_embeds: Optional[torch.Tensor] = None
    text_embeds: Optional[torch.Tensor] = None


class SHERLTower(nn.Module):
    """One encoder's SHERL route; the backbone is passed in, not held, so its parameters keep one name
    (`backbone.…`) in the model."""

    def __init__(self, backbone, config, what: str):
        super().__init__()
        depth = backbone.num_layers
        check(len(backbone.stage_starts) == 1,
              f"sherl form=retrieval: the {what} tower ({backbone.family}) has stages of several widths; "
              "allowed: one-width encoders (ViT, DINOv2 images; BERT-like text)")
        check(config.late_layers < depth, f"sherl.late_layers={config.late_layers} leaves no early layer in the "
                                          f"{depth}-layer {what} tower; allowed: 1..{depth - 1}")
        recipe = config.resolved(backbone)                  # r, projection, restore, init, drop_every
        D = backbone.hidden_size
        d = D // recipe["r"]
        check(d >= 1, f"sherl.r={recipe['r']} leaves a side width of 0 for the {what} tower's hidden size {D}; "
                      f"allowed: 1..{D}")
        self.what = what
        self.side_width = d
        self.num_early = depth - config.late_layers
        self.taps = collected_blocks(self.num_early, recipe["drop_every"])
        self.mtsa = MTSA(1 + len(self.taps), D, d, recipe["projection"], recipe["restore"], config.gate_init,
                         config.temperature, config.tap_storage, recipe["init"])

    def forward(self, backbone, batch: dict, eval_trunk: bool) -> torch.Tensor:
        """batch → pooled features B×F (F = backbone.feature_size)."""
        with torch.no_grad(), trunk_eval_mode(backbone, eval_trunk):
            h, ctx = backbone.embed(batch)                                           # F_0: B×K×D
            _, feats = backbone.forward_intermediates(h, ctx, self.taps, stop=self.num_early)
        x = self.mtsa([h] + feats)                                                   # X̃: B×K×D, the graph starts
        for i in range(self.num_early, backbone.num_layers):
            x = backbone.run_block(i, x, ctx)                                        # frozen, gradient flows
        return backbone.pool(backbone.finish(x, ctx), ctx)


class SHERLRetrievalModel(MemtuneModel):
    """Two SHERL towers over an image-text composition, fused only by cosine similarity (module docstring)."""

    visual_path = True          # the image goes through its own tower (the text backbone never sees it)
    fixed_objective = "retrieval"   # no head and no LM head: the loss reads the B×B similarities

    def __init__(self, backbone, config, num_labels=None):
        vision = getattr(backbone, "vision", None)
        check(vision is not None and "visual_side_tokens" in backbone.capabilities,
              f"sherl form=retrieval needs an image-text composition (memtune.compose(vision, text), or an alias "
              f"such as tiny-vl-bert or dinov2-s+minilm); got a {backbone.family} model")
        check(not (backbone.is_encoder_decoder or backbone.is_causal_lm),
              f"sherl form=retrieval: the text tower must be a BERT-like encoder (bert, roberta, xlm-roberta), "
              f"not {backbone.config.model_type}")
        check(num_labels is None, f"sherl form=retrieval has no class head (its output is the B×B similarity of "
                                  f"images and captions); wrap it without num_labels, got {num_labels}")
        check(not config.cache_trunk, "sherl form=retrieval does not support cache_trunk (two towers with inputs "
                                      "of their own); use cache_trunk=false")
        super().__init__(backbone, config, num_labels)
        self.text_tower = SHERLTower(backbone, config, "text")
        self.image_tower = SHERLTower(vision, config, "image")
        self.text_fc = nn.Linear(backbone.feature_size, config.embed_size)          # F_txt → E
        self.image_fc = nn.Linear(vision.feature_size, config.embed_size)           # F_img → E
        log_t = torch.full((1,), math.log(config.infonce_temperature))
        if config.loss == "infonce" and config.learn_temperature:
            self.log_temperature = nn.Parameter(log_t)
        else:
            self.register_buffer("log_temperature", log_t, persistent=False)

    @property
    def feature_size(self) -> int:
        return self.method_config.embed_size

    # -- the towers --------------------------------------------------------------------------------
    def text_features(self, batch: dict) -> torch.Tensor:
        """The text tower's pooled output B×F_txt (before text_fc)."""
        return self.text_tower(self.backbone, batch, not self.method_config.trunk_dropout)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled output B×F_img (before image_fc)."""
        vision = self.backbone.vision
        px = pixel_values.to(next(vision.parameters()).dtype)
        return self.image_tower(vision, {"pixel_values": px}, not self.method_config.trunk_dropout)

    def encode_text(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """B×T ids → B×E unit-norm caption embeddings."""
        batch = {"input_ids": input_ids}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        if token_type_ids is not None:
            batch["token_type_ids"] = token_type_ids
        return F.normalize(self.text_fc(self.text_features(batch)), dim=-1)

    def encode_image(self, pixel_values) -> torch.Tensor:
        """B×3×S×S pixels → B×E unit-norm image embeddings."""
        return F.normalize(self.image_fc(self.image_features(pixel_values)), dim=-1)

    def features(self, batch):
        raise NotImplementedError("a retrieval model has two outputs: use encode_image and encode_text")

    @property
    def early_blocks(self) -> list[nn.Module]:
        """The blocks that run without a graph, text tower's then image tower's."""
        bb, vision = self.backbone, self.backbone.vision
        return list(bb.blocks[:self.text_tower.num_early]) + list(vision.blocks[:self.image_tower.num_early])

    @property
    def late_blocks(self) -> list[nn.Module]:
        bb, vision = self.backbone, self.backbone.vision
        return list(bb.blocks[self.text_tower.num_early:]) + list(vision.blocks[self.image_tower.num_early:])

    # -- the loss ----------------------------------------------------------------------------------
    @property
    def infonce_temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp_min(MIN_TEMPERATURE)

    def contrastive_loss(self, sim: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of a B×B similarity matrix (rows images, columns captions, pair i on the diagonal), in fp32.
        Off-diagonal pairs of the same label are not negatives."""
        sim = sim.float()
        B = sim.shape[0]
        eye = torch.eye(B, dtype=torch.bool, device=sim.device)
        negatives = ~eye
        if labels is not None:
            negatives &= labels.view(-1, 1) != labels.view(1, -1)
        cfg = self.method_config
        if cfg.loss == "infonce":
            logits = (sim / self.infonce_temperature.float()).masked_fill(~(negatives | eye), float("-inf"))
            target = torch.arange(B, device=sim.device)
            return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        pos = sim.diagonal()
        cost_txt = (cfg.margin + sim - pos.view(-1, 1)).clamp_min(0).masked_fill(~negatives, 0.0)  # image i, caption j
        cost_img = (cfg.margin + sim - pos.view(1, -1)).clamp_min(0).masked_fill(~negatives, 0.0)  # caption j, image i
        if cfg.hardest_negative:
            return (cost_txt.amax(1).sum() + cost_img.amax(0).sum()) / B
        return (cost_txt.sum() + cost_img.sum()) / B

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None, labels=None,
                example_id=None, **extra) -> RetrievalOutput:
        if pixel_values is None or input_ids is None:
            raise ValueError("a retrieval model needs pixel_values (B×3×S×S) and the captions' input_ids (B×T)")
        img = self.encode_image(pixel_values)                                        # B×E
        txt = self.encode_text(input_ids, attention_mask, token_type_ids)            # B×E
        sim = img @ txt.t()                                                          # B×B
        return RetrievalOutput(loss=self.contrastive_loss(sim, labels), logits=sim, image_embeds=img,
                               text_embeds=txt)

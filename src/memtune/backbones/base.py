"""The backbone protocol: one small adapter per model family.

Every method reaches the pretrained model only through these few calls, so a new family is one file:

    h, ctx = backbone.embed(batch)          # h: B×T×d, ctx: masks, position biases, ... for the blocks
    for i in range(backbone.num_layers):
        h = backbone.run_block(i, h, ctx)   # block i of the (encoder) stack
    h = backbone.finish(h, ctx)             # final norm (and for T5: the decoder pass)
    feats = backbone.pool(h, ctx)           # B×feature_size, for classification heads

`ctx` is a plain dict, so a method may add its own entries (it is rebuilt on every `embed`).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

Context = dict[str, Any]


class UnsupportedModel(ValueError):
    """The model's family (or a feature of it) is not supported; the message lists what is."""


class Backbone(nn.Module):
    family: ClassVar[str] = ""
    # Batch keys the model reads (the rest, e.g. `labels`, is the method's business).
    input_keys: ClassVar[tuple[str, ...]] = ()
    # Names (last path component) of the linear layers that LoRA targets by default.
    lora_targets: ClassVar[tuple[str, ...]] = ()
    # Linear layers that IA3 rescales, and which of them sit in the feed-forward part.
    ia3_targets: ClassVar[tuple[str, ...]] = ()
    ia3_feedforward: ClassVar[tuple[str, ...]] = ()
    # Sub-layer output projections (attention out, FFN out) after which bottleneck adapters go.
    adapter_sites: ClassVar[tuple[str, ...]] = ()
    # True for decoders that predict the next token with a (frozen) LM head.
    is_causal_lm: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    # -- shape facts -------------------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def feature_size(self) -> int:
        """Width of `pool`'s output."""
        return self.hidden_size

    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    # -- the protocol --------------------------------------------------------------------------
    def embed(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Context]:
        raise NotImplementedError

    def run_block(self, i: int, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    def finish(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Final norm of the stack: B×T×d → B×T×d."""
        return h

    def pool(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Token states B×T×d → features B×feature_size. Default: mean over real tokens."""
        mask = ctx.get("token_mask")
        if mask is None:
            return h.mean(dim=1)
        m = mask.to(h.dtype).unsqueeze(-1)  # B×T×1
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        raise UnsupportedModel(f"{self.family} backbones have no language-model head")

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Context]:
        """The pretrained computation, block by block: returns finished token states and ctx."""
        h, ctx = self.embed(batch)
        for i in range(self.num_layers):
            h = self.run_block(i, h, ctx)
        return self.finish(h, ctx), ctx

    # -- helpers for planners and tests -------------------------------------------------------------
    def example_batch(self, batch_size: int, length: int, device=None) -> dict[str, torch.Tensor]:
        """A batch of the right keys and shapes (all tokens real), for memory runs and tests."""
        vocab = getattr(self.config, "vocab_size", 100)
        ids = torch.randint(5, max(6, vocab), (batch_size, length), device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k in self.input_keys}

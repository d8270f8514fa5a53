"""The QST model: a frozen backbone run block by block without autograd, interleaved with a side network.

    with no_grad: h, ctx = embed(batch)                       # h: B×T×d
    s = D_0(h)                                                 # B×T×d'
    for i in 0..N-1:
        with no_grad: h = block_i(h)                           # frozen (any dtype, e.g. 4-bit linears)
        s = G_i((1−β_i)⊙D_i(h) + β_i⊙s)                        # side step (optionally checkpointed)
    with no_grad: h_N = finish(h)                              # the backbone's final norm (BERT: none)
    o = mix(h_N, Up(Norm_side(s)))                             # B×T×d, o = h_N at init in paper form

Heads (docs/methods/qst.md §3):
- llama, causal LM: logits = LMHead(o), the frozen LM head run with autograd (∂L/∂o is needed).
- llama, classification: the last real token of o (right padding) → Score, a trainable d×C linear
  map without bias (the AutoModelForSequenceClassification head).
- bert, vit: the backbone's own pooling of o (BERT: mean over real tokens; ViT/DINOv2: [CLS ‖ mean of
  patches]) → memtune's linear head.

Interleaving keeps at most one backbone hidden state alive besides those the downsamples keep for
backward: with a pooling downsample each h_i is freed once block i+1 has run.

Trunk cache (`cache_trunk`, training only): the N block outputs h_1..h_N are a deterministic function of
the example when the backbone runs in eval mode, so they are computed all at once (padded rows zeroed),
stored per example, and replayed in later epochs; the side loop then reads them from that list, freeing
each after its downsample has read it. The embedding is recomputed every time (it also gives the masks
and positions) and the final norm is re-applied to the replayed h_N (one norm per token), so a stored
example is N×T_e×d values. The real rows are the same as in the interleaved form, so the loss is too.

Paper form at the start: α = 1, so ∂o/∂u = 1 − α = 0 and the first step's gradient reaches only α
(and a classifier); once α has moved below 1 the whole side network trains. The sigmoid form has
every gradient from the first step.

The side blocks are the backbone's own block class, built from the narrowed config with PyTorch's
default init (docs/methods/qst.md §4: no HF init, no pruning). BERT-like blocks are post-LN (each ends in a
LayerNorm) and the backbone has no final norm, so the side final norm is the identity there.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..base import MemtuneModel
from ..common.trunk_cache import cached_trunk, check_trunk_deterministic, trunk_eval_mode
from .generate import greedy_generate
from .side import OutputMix, SideNetwork, resolve_r


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the backbone's first floating-point parameter (4-bit linears store packed integers;
    their embeddings and norms keep the compute dtype)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def drain(items: list):
    """Yield the items of a list front to back, dropping each from the list as it is handed out (so a tap
    is freed once its reader is done with it)."""
    items.reverse()
    while items:
        yield items.pop()


class QSTModel(MemtuneModel):
    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        config.check_side_heads(backbone)
        if config.cache_trunk:
            check_trunk_deterministic("qst", [backbone], config.trunk_dropout)
        self.r, note = resolve_r(backbone, config.r, config.side_heads)
        if note:
            warnings.warn(note, stacklevel=3)
        d = backbone.hidden_size
        ref = next(backbone.parameters())
        dtype = float_dtype(backbone)
        attention = self.side_attention
        self.side_config = backbone.side_config(backbone.config, self.r, attention=attention,
                                                attention_dropout=config.side_attention_dropout(attention, None),
                                                heads=config.side_heads, exact=True)
        d_side = self.side_config.hidden_size
        with torch.device(ref.device):
            blocks = [backbone.make_side_block(self.side_config, j) for j in range(backbone.num_layers)]
            self.side = SideNetwork(d, d_side, self.r, blocks, backbone.side_norm(d_side, self.side_config),
                                    config.downsample, config.k, config.gate, config.tap_storage)
            self.mix = OutputMix(d, config.mix, config.lambda_init)
            self.rotary = backbone.make_side_rotary(self.side_config)
            if num_labels and "decoder" in backbone.capabilities:
                self.head = nn.Linear(d, num_labels, bias=False)       # Score: d×C, no bias
        self.side.to(dtype)
        self.mix.to(dtype)
        if self.head is not None:
            self.head.to(dtype)
        self.trunk_cache = config.make_trunk_cache()

    @property
    def side_attention(self) -> str:
        """The side blocks' kernel after resolving "auto": sdpa where the side block class has a fused path."""
        return self.method_config.side_kernel(self.backbone)

    # -- the side network ------------------------------------------------------------------------------------
    def side_step(self, i: int, s: torch.Tensor, h: torch.Tensor, sctx) -> torch.Tensor:
        """Gate fusion, downsample and side block i: s (B×T×d'), h (B×T×d, frozen) → B×T×d'."""
        def step(s_in, h_in):
            return self.backbone.run_side_block(self.side.blocks[i], self.side.fuse(i, s_in, h_in), sctx)

        if self.method_config.side_checkpointing and torch.is_grad_enabled():
            return checkpoint(step, s, h, use_reentrant=False)
        return step(s, h)

    # -- the forward pass ------------------------------------------------------------------------------------
    def block_outputs(self, batch, e: torch.Tensor, ctx):
        """An iterator over the frozen block outputs h_1..h_N (B×T×d each) for `batch`, whose embedding
        output is e (B×T×d). Without a trunk cache (or outside training) each block runs, without autograd,
        when the side loop asks for its output; with one they are replayed from it, or computed all at once
        and stored."""
        bb = self.backbone
        cache = self.trunk_cache if self.training else None
        if cache is None:
            return (h for _, h in bb.iter_blocks(e, ctx, bb.num_layers))
        mask = ctx.get("token_mask")
        # The cache keeps real rows only, so padded rows are zero in every epoch (real rows never read them).
        real = None if mask is None or bool(mask.all()) else mask.to(e.dtype).unsqueeze(-1)   # B×T×1

        def compute():                                               # [h_1, ..., h_N]
            return bb.forward_intermediates(e, ctx, range(bb.num_layers), row_mask=real)[1]

        with torch.no_grad():
            outs = cached_trunk(cache, batch, mask, bb.input_keys, compute, e)
        return drain(outs)

    def mixed_output(self, batch):
        """Returns (o, ctx, h_N): o the mixed B×T×d states, h_N the frozen backbone's finished states."""
        bb = self.backbone
        with trunk_eval_mode(bb, not self.method_config.trunk_dropout):
            with torch.no_grad():
                h, ctx = bb.embed(batch)                             # B×T×d
            s = self.side.start(h)                                   # B×T×d'
            sctx = bb.side_context(s, ctx, self.side_config, self.rotary)
            for i, h in enumerate(self.block_outputs(batch, h, ctx)):
                s = self.side_step(i, s, h, sctx)
            with torch.no_grad():
                h_final = bb.finish(h, ctx)
        o = self.mix(h_final, self.side.finish(s))                   # B×T×d
        return o, ctx, h_final

    def features(self, batch):
        o, ctx, _ = self.mixed_output(batch)
        if self.objective == "causal-lm":
            return o                                                  # the frozen LM head follows
        return self.backbone.pool(o, ctx)

    # -- decoding ---------------------------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, stop_at_eos: bool = True):
        """Greedy decoding (Llama-like causal LM) with KV caches for the backbone and the side blocks.
        Returns B×(T + n) ids: the (left-padded) prompts and the new tokens; see `generate.py`."""
        return greedy_generate(self, input_ids, attention_mask, max_new_tokens, stop_at_eos)

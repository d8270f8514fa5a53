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
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from ..base import MemtuneModel, check
from ..common.trunk_cache import cached_trunk, check_trunk_deterministic, trunk_eval_mode
from ..lst.side import make_block
from .generate import greedy_generate
from .side import OutputMix, SideNetwork, resolve_r, side_config


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
        self.freeze_backbone()
        self.family = backbone.family
        self._check_options(backbone, config)
        bb_config = backbone.config
        self.r, note = resolve_r(self.family, bb_config, config.r, config.side_heads)
        if note:
            warnings.warn(note, stacklevel=3)
        d = backbone.hidden_size
        ref = next(backbone.parameters())
        dtype = float_dtype(backbone)
        attention = self.side_attention
        attn_p = config.attention_dropout
        if attn_p is None and attention == "sdpa":
            attn_p = 0.0                                   # a dropout > 0 defeats the fused kernel
        self.side_config = side_config(self.family, bb_config, self.r, attention,
                                       is_dinov2=getattr(backbone, "is_dinov2", False),
                                       attention_dropout=attn_p, heads=config.side_heads)
        d_side = self.side_config.hidden_size
        with torch.device(ref.device):
            cls = type(backbone.blocks[0])
            blocks = [make_block(cls, self.side_config, j) for j in range(backbone.num_layers)]
            self.side = SideNetwork(d, d_side, self.r, blocks, self._side_norm(d_side), config.downsample,
                                    config.k, config.gate, config.tap_storage)
            self.mix = OutputMix(d, config.mix, config.lambda_init)
            if self.family == "llama":
                self.rotary = type(backbone.decoder.rotary_emb)(self.side_config)
                if num_labels:
                    self.head = nn.Linear(d, num_labels, bias=False)       # Score: d×C, no bias
        self.side.to(dtype)
        self.mix.to(dtype)
        if self.head is not None:
            self.head.to(dtype)
        self.trunk_cache = config.make_trunk_cache()

    def _check_options(self, backbone, config):
        heads = backbone.config.num_attention_heads
        if config.side_heads is not None and config.side_heads != heads:
            check(self.family in ("bert", "vit") and not getattr(backbone, "is_mpnet", False),
                  f"qst.side_heads={config.side_heads}: another head count than the backbone's ({heads}) is "
                  f"supported for bert (not MPNet, whose relative position bias has H heads) and vit backbones only")
        if config.cache_trunk:
            check_trunk_deterministic("qst", [backbone], config.trunk_dropout)

    @property
    def side_attention(self) -> str:
        """The side blocks' kernel after resolving "auto": sdpa where the side block class has a fused path."""
        a = self.method_config.attention
        if a != "auto":
            return a
        return "eager" if getattr(self.backbone, "is_mpnet", False) else "sdpa"

    @property
    def cache_bytes(self) -> int:
        """Host bytes held by the trunk cache (0 without one)."""
        return 0 if self.trunk_cache is None else self.trunk_cache.nbytes

    def _side_norm(self, d_side: int) -> nn.Module:
        c = self.side_config
        if self.family == "llama":
            return type(self.backbone.decoder.norm)(d_side, eps=c.rms_norm_eps)
        if self.family == "vit":
            return nn.LayerNorm(d_side, eps=c.layer_norm_eps)
        return nn.Identity()

    # -- the side network's attention context ------------------------------------------------------------------
    @torch.no_grad()
    def side_context(self, s: torch.Tensor, ctx) -> dict:
        """Masks (and rotary tables) at the side width for the side blocks; s: B×T×d'."""
        c = self.side_config
        if self.family == "llama":
            pos = ctx["position_ids"]
            return {"mask": create_causal_mask(config=c, inputs_embeds=s, attention_mask=ctx["token_mask"],
                                               past_key_values=None, position_ids=pos),
                    "rope": self.rotary(s, pos), "pos": pos}
        if self.family == "bert":
            out = {"mask": create_bidirectional_mask(config=c, inputs_embeds=s, attention_mask=ctx["token_mask"])}
            if "position_bias" in ctx:
                out["position_bias"] = ctx["position_bias"]   # MPNet: H kept, so the B×H×T×T bias fits
            return out
        return {}

    def run_side_block(self, i: int, x: torch.Tensor, sctx) -> torch.Tensor:
        block = self.side.blocks[i]
        if self.family == "llama":
            return block(x, attention_mask=sctx["mask"], position_embeddings=sctx["rope"], position_ids=sctx["pos"])
        if self.family == "bert":
            if "position_bias" in sctx:
                return block(x, sctx["mask"], sctx["position_bias"])[0]
            out = block(x, attention_mask=sctx["mask"])
            return out[0] if isinstance(out, tuple) else out
        return block(x)

    def side_step(self, i: int, s: torch.Tensor, h: torch.Tensor, sctx) -> torch.Tensor:
        """Gate fusion, downsample and side block i: s (B×T×d'), h (B×T×d, frozen) → B×T×d'."""
        def step(s_in, h_in):
            return self.run_side_block(i, self.side.fuse(i, s_in, h_in), sctx)

        if self.method_config.side_checkpointing and torch.is_grad_enabled():
            return checkpoint(step, s, h, use_reentrant=False)
        return step(s, h)

    # -- the forward pass ------------------------------------------------------------------------------------
    def _run_blocks(self, h: torch.Tensor, ctx):
        """h_1..h_N (B×T×d each, no graph), one block per item asked for: the interleaved form."""
        bb = self.backbone
        for i in range(bb.num_layers):
            with torch.no_grad():                                    # not across the yield: the side has grad
                h = bb.run_block(i, h, ctx)
            yield h

    def block_outputs(self, batch, e: torch.Tensor, ctx):
        """An iterator over the frozen block outputs h_1..h_N (B×T×d each) for `batch`, whose embedding
        output is e (B×T×d). Without a trunk cache (or outside training) each block runs when the side loop
        asks for its output; with one they are replayed from it, or computed all at once and stored."""
        cache = self.trunk_cache if self.training else None
        if cache is None:
            return self._run_blocks(e, ctx)
        mask = ctx.get("token_mask")
        # The cache keeps real rows only, so padded rows are zero in every epoch (real rows never read them).
        real = None if mask is None or bool(mask.all()) else mask.to(e.dtype).unsqueeze(-1)   # B×T×1

        def compute():                                               # [h_1, ..., h_N]
            outs = list(self._run_blocks(e, ctx))
            if real is not None:
                for h in outs:                                       # in place: every block has run
                    h.mul_(real)
            return outs

        with torch.no_grad():
            outs = cached_trunk(cache, batch, mask, self.backbone.input_keys, compute, e)
        return drain(outs)

    def mixed_output(self, batch):
        """Returns (o, ctx, h_N): o the mixed B×T×d states, h_N the frozen backbone's finished states."""
        bb = self.backbone
        with trunk_eval_mode(bb, not self.method_config.trunk_dropout):
            with torch.no_grad():
                h, ctx = bb.embed(batch)                             # B×T×d
            s = self.side.start(h)                                   # B×T×d'
            sctx = self.side_context(s, ctx)
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

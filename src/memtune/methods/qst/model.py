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
- swin (hierarchical stages of width C_s): a staged side network, as LST's (docs/methods/qst.md "Swin"). D_0
  reads the embedding output (C_0 → d'_0), D_i block i's in-stage output (before the frozen patch merging,
  C_s → d'_s); after the side block that ends a stage a trainable side patch merging takes s to the next
  stage's grid and width; Up: d'_last → C_last; features = the backbone's mean over all tokens of o.
- t5, bart, mbart (encoder-decoders): a side encoder and a side decoder (`encoder_decoder.py`); o is the mixed
  decoder output, pooled the backbone's way for classification, or sent through the tied LM head (seq2seq).
  Text-to-text decoding goes through the forward (memtune.seq2seq.greedy_generate); the trunk cache and the
  cached `generate` are single-stack only.

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

import contextlib
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..base import ConfigError, MemtuneModel, check
from ..common.trunk_cache import cached_trunk, check_trunk_deterministic, trunk_eval_mode
from .encoder_decoder import EncoderDecoderSide
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
        config.check_side_heads(backbone, exact=True)
        self.staged = "stages" in backbone.capabilities              # per-stage side widths and side transitions
        if config.cache_trunk:
            check(not self.staged,
                  f"qst.cache_trunk is not supported on {backbone.family}: its block outputs change width and token "
                  f"count from stage to stage, and the trunk cache stores one width; leave cache_trunk off")
            check(not backbone.is_encoder_decoder,
                  f"qst.cache_trunk is supported for single-stack backbones (encoders and decoders), not the "
                  f"{backbone.family} encoder-decoder, whose decoder blocks read the encoder output of each step; "
                  f"leave cache_trunk=false")
            check_trunk_deterministic("qst", [backbone], config.trunk_dropout)
        self.r, note = resolve_r(backbone, config.r, config.side_heads)
        if note:
            warnings.warn(note, stacklevel=3)
        d = backbone.hidden_size
        ref = next(backbone.parameters())
        dtype = float_dtype(backbone)
        attention = self.side_attention
        if backbone.is_encoder_decoder:           # two side stacks (encoder_decoder.py); the base linear head
            with torch.device(ref.device):
                self.side = EncoderDecoderSide(backbone, config, self.r, attention)
                self.mix = OutputMix(d, config.mix, config.lambda_init)
            self.side_config, self.rotary = None, None
        else:
            self.side_config = backbone.side_config(backbone.config, self.r, attention=attention,
                                                    attention_dropout=config.side_attention_dropout(attention, None),
                                                    heads=config.side_heads, exact=True)
            d_side = self.side_config.hidden_size                   # staged: the last stage's d'
            d_in, d_start, widths = d, d_side, None
            with torch.device(ref.device):
                transitions = {}
                if self.staged:
                    # D_i: C_s → d'_s of block i's stage; D_0 also reads the embedding output (C_0 → d'_0).
                    widths = tuple(zip(backbone.block_widths, backbone.side_block_widths(self.side_config)))
                    d_in, d_start = widths[0]
                    transitions = backbone.make_side_transitions(self.side_config)
                blocks = [backbone.make_side_block(self.side_config, j) for j in range(backbone.num_layers)]
                self.side = SideNetwork(d_in, d_start, self.r, blocks, backbone.side_norm(d_side, self.side_config),
                                        config.downsample, config.k, config.gate, config.tap_storage,
                                        layer_widths=widths, transitions=transitions)
                self.mix = OutputMix(d, config.mix, config.lambda_init)
                self.rotary = backbone.make_side_rotary(self.side_config)
                if num_labels and "decoder" in backbone.capabilities:
                    self.head = nn.Linear(d, num_labels, bias=False)       # Score: d×C, no bias
        self.side.to(dtype)
        self.mix.to(dtype)
        if self.head is not None:
            self.head.to(dtype)
        self.trunk_cache = config.make_trunk_cache()

    def graph_free_blocks(self) -> list[nn.Module]:
        """Every backbone block runs without an autograd graph: the stack's, and an encoder-decoder's decoder's."""
        bb = self.backbone
        merges = list(bb.stage_merges().values()) if self.staged else []       # Swin's frozen patch mergings
        return list(bb.blocks) + (list(bb.decoder_blocks) if bb.is_encoder_decoder else []) + merges

    @property
    def side_attention(self) -> str:
        """The side blocks' kernel after resolving "auto": sdpa where the side block class has a fused path."""
        return self.method_config.side_kernel(self.backbone)

    # -- the side network ------------------------------------------------------------------------------------
    def side_step(self, side: SideNetwork, i: int, s: torch.Tensor, h: torch.Tensor, sctx) -> torch.Tensor:
        """Gate fusion, downsample and side block i of `side` (the side network, or one side stack of an
        encoder-decoder): s (B×T×d'), h (B×T×d, frozen) → B×T×d'."""
        if not (self.method_config.side_checkpointing and torch.is_grad_enabled()):
            return self.backbone.run_side_block(side.blocks[i], side.fuse(i, s, h), sctx)
        # Checkpointed. A parameter-free downsample (avgpool) runs outside, so the checkpoint keeps Down_i(h)
        # (B×T×d'_i) and not the full-width h (B×T×d_i); a trainable one keeps h for its weight gradient anyway,
        # so it runs inside and h is kept once.
        outside = not any(p.requires_grad for p in side.downsamples[i].parameters())
        tap = side.downsamples[i](h) if outside else h
        # Some side blocks write into their context (T5: block 0 adds the relative position bias that the later
        # blocks read), so the recompute in backward must start from the context as this step first saw it.
        before, runs = dict(sctx), []

        def step(s_in, tap_in):
            from ...memory.plan_step import backward_modes     # the planner's kernel modes (else a no-op)

            runs.append(dict(before))
            # The second run is the recompute, inside backward.
            with contextlib.nullcontext() if len(runs) == 1 else backward_modes():
                fused = side.mix(i, s_in, tap_in) if outside else side.fuse(i, s_in, tap_in)
                return self.backbone.run_side_block(side.blocks[i], fused, runs[-1])

        out = checkpoint(step, s, tap, use_reentrant=False)
        sctx.update(runs[0])                                          # what the forward run wrote
        return out

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

    def staged_loop(self, h: torch.Tensor, ctx, s: torch.Tensor, sctx) -> tuple[torch.Tensor, torch.Tensor]:
        """A staged backbone's blocks interleaved with the side steps, from the embedding output h (B×T_0×C_0)
        and s = D_0(h) (B×T_0×d'_0). D_i reads block i's in-stage output (B×T_s×C_s), before the frozen stage
        transition that may follow it; at the end of a stage the side transition takes s to B×T_(s+1)×d'_(s+1).
        Returns (h_N, B×T_last×C_last, and s_N, B×T_last×d'_last)."""
        bb = self.backbone
        for i in range(bb.num_layers):
            with torch.no_grad():
                h = bb.run_block_in_stage(i, h, ctx)                # B×T_s×C_s
            s = self.side_step(self.side, i, s, h, sctx)             # B×T_s×d'_s
            merge = self.side.transition(i)
            if merge is not None:
                s = bb.run_side_transition(merge, s, sctx)           # B×T_s×d'_s → B×T_(s+1)×d'_(s+1)
            with torch.no_grad():
                h = bb.stage_transition(i, h, ctx)                   # frozen patch merging (identity inside a stage)
        return h, s

    def mixed_output(self, batch):
        """Returns (o, ctx, h_N): o the mixed B×T×d states, h_N the frozen backbone's finished states."""
        bb = self.backbone
        if bb.is_encoder_decoder:                                    # o: the mixed decoder states B×Tt×d
            with trunk_eval_mode(bb, not self.method_config.trunk_dropout):
                return self.side(self, batch)
        with trunk_eval_mode(bb, not self.method_config.trunk_dropout):
            with torch.no_grad():
                h, ctx = bb.embed(batch)                             # B×T×d
            s = self.side.start(h)                                   # B×T×d'
            sctx = bb.side_context(s, ctx, self.side_config, self.rotary)
            if self.staged:
                h, s = self.staged_loop(h, ctx, s, sctx)
            else:
                for i, h in enumerate(self.block_outputs(batch, h, ctx)):
                    s = self.side_step(self.side, i, s, h, sctx)
            with torch.no_grad():
                h_final = bb.finish(h, ctx)
        o = self.mix(h_final, self.side.finish(s))                   # B×T×d
        return o, ctx, h_final

    def features(self, batch):
        o, ctx, _ = self.mixed_output(batch)
        if self.per_token:
            return o                                                  # the frozen (tied) LM head follows
        return self.backbone.pool(o, ctx)

    # -- decoding ---------------------------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, stop_at_eos: bool = True):
        """Greedy decoding (Llama-like causal LM) with KV caches for the backbone and the side blocks.
        Returns B×(T + n) ids: the (left-padded) prompts and the new tokens; see `generate.py`."""
        if self.backbone.is_encoder_decoder:
            raise ConfigError(f"qst.generate (cached decoding) is for Llama-like causal LMs; on the "
                              f"{self.backbone.family} encoder-decoder decode through the forward with "
                              f"memtune.seq2seq.greedy_generate (what memtune eval does)")
        return greedy_generate(self, input_ids, attention_mask, max_new_tokens, stop_at_eos)

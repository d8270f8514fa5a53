"""The LST model: a frozen backbone run without autograd, and a side network that makes the prediction.

    taps, ctx = model.backbone_taps(batch)    # no grad: the embedding output and the outputs of kept blocks
    out = model.side_forward(taps, ctx)       # B×T×d: W_up·drop(Norm_side(s)) + b_up (T5: the decoder's)

Forms (docs/methods/lst.md §3, §4):
- bert, vit: encoder form. Features = the backbone's own pooling of the up-projected side output
  (BERT: mean over real tokens; ViT/DINOv2: [CLS ‖ mean of patches]); the head is a new linear layer.
- llama: the same recursion as a causal side decoder (side self-attention is causal, with its own
  rotary table at the side head width). Causal LM: the up-projected states go through the frozen LM
  head (the backbone's final norm is not applied; the side final norm takes its place). Classification:
  the last real token of the up-projected states.
- t5: side encoder over the encoder blocks and side decoder over the decoder blocks; the side decoder
  cross-attends to s_enc (width d') only. Classification reads the up-projected side decoder output at
  the start position (the backbone's own pooling), through a new linear head. `lm_logits` gives the
  text-to-text logits LMHead(o·d^-1/2) through the tied embedding; `generate` decodes greedily or with
  beam search, with KV caches for the backbone decoder and the side decoder.

W0 reads, with the side's own dropout draw: for T5 the raw embedding e (the backbone's embedding
dropout is separate, as in §3); for the other families the embedding output as the backbone's `embed`
returns it (HF embedding modules apply their dropout inside: BERT 0.1, ViT/DINOv2 0, Llama none).

The backbone blocks after the last kept layer are not run (their outputs would not be read); T5's
encoder always runs to the end because the backbone decoder cross-attends to its output.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from ..base import MemtuneModel, check
from ..common.trunk_cache import cached_trunk, check_trunk_deterministic, trunk_eval_mode
from .fisher import fisher_importance
from .prune import Pruner, embedding_dims
from .side import SideStack, family_init, make_block, side_config, small_normal_


class LSTModel(MemtuneModel):
    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        self.freeze_backbone()
        self.family = backbone.family
        self._check_options(backbone, config)
        ref = next(backbone.parameters())
        self.stacks = nn.ModuleDict()
        self.side_configs: dict = {}
        with torch.device(ref.device):
            if self.family == "t5":
                model = backbone.model
                keep = config.kept(min(len(backbone.blocks), len(backbone.decoder_blocks)))
                self._add_stack("encoder", model.encoder.config, backbone.blocks, keep)
                self._add_stack("decoder", model.decoder.config, backbone.decoder_blocks, keep)
            elif self.family == "llama":
                self._add_stack("decoder", backbone.config, backbone.blocks, config.kept(backbone.num_layers))
                self.rotary = type(backbone.decoder.rotary_emb)(self.side_configs["decoder"])
            else:
                self._add_stack("encoder", backbone.config, backbone.blocks, config.kept(backbone.num_layers))
            d_side = next(iter(self.stacks.values())).ladders["embed"].out_features
            self.up = small_normal_(nn.Linear(d_side, backbone.hidden_size))     # W_up: d' → d
        self.stacks.to(ref.dtype)
        self.up.to(ref.dtype)
        self.data_init_pending = config.init == "fisher"
        self.pruning_records: dict = {}
        if config.init != "random" and ref.device.type != "meta":   # meta: shapes only, nothing to copy
            self.init_from_importance(lambda name, p: p.detach().abs())
        self.trunk_cache = config.make_trunk_cache()

    def _check_options(self, backbone, config):
        mpnet = getattr(backbone, "is_mpnet", False)
        heads = getattr(backbone.config, "num_attention_heads", getattr(backbone.config, "num_heads", None))
        if config.side_heads is not None and config.side_heads != heads:
            check(self.family in ("bert", "vit") and not mpnet,
                  f"lst.side_heads={config.side_heads}: another head count than the backbone's ({heads}) is "
                  f"supported for bert (not MPNet, whose relative bias has H heads) and vit backbones only")
        if config.cache_trunk:
            check(self.family != "t5", "lst.cache_trunk is supported for bert, vit and llama backbones, not t5")
            check_trunk_deterministic("lst", [backbone], config.trunk_dropout)

    @property
    def side_attention(self) -> str:
        """The side blocks' kernel after resolving "auto": sdpa where the side block class has a fused path."""
        a = self.method_config.attention
        if a != "auto":
            return a
        return "eager" if self.family == "t5" or getattr(self.backbone, "is_mpnet", False) else "sdpa"

    @property
    def cache_bytes(self) -> int:
        """Host bytes held by the trunk cache (0 without one)."""
        return 0 if self.trunk_cache is None else self.trunk_cache.nbytes

    # -- construction ----------------------------------------------------------------------------------------
    @property
    def output_stack(self) -> SideStack:
        return self.stacks["decoder" if "decoder" in self.stacks else "encoder"]

    def _add_stack(self, name, stack_config, blocks, keep):
        bb = self.backbone
        mc = self.method_config
        attention = self.side_attention
        attn_p = mc.attention_dropout
        if attn_p is None:
            attn_p = 0.0 if attention == "sdpa" else mc.dropout     # a dropout > 0 defeats the fused kernel
        cfg = side_config(self.family, stack_config, mc.r, mc.dropout, keep, is_dinov2=getattr(bb, "is_dinov2", False),
                          attention=attention, attention_dropout=attn_p, heads=mc.side_heads)
        self.side_configs[name] = cfg
        cls = type(blocks[0])
        # T5: the first kept side block owns the stack's 32×H relative-position table.
        side_blocks = [make_block(cls, cfg, j, has_relative_attention_bias=(j == 0)) for j in range(len(keep))]
        if self.family == "t5":
            final = getattr(bb.model, name).final_layer_norm
            d_side = cfg.d_model
            norm = type(final)(d_side, eps=cfg.layer_norm_epsilon)
        elif self.family == "llama":
            d_side = cfg.hidden_size
            norm = type(bb.decoder.norm)(d_side, eps=cfg.rms_norm_eps)
        elif self.family == "vit":
            d_side = cfg.hidden_size
            norm = nn.LayerNorm(d_side, eps=cfg.layer_norm_eps)
        else:
            # BERT-like blocks are post-LN (each ends in a LayerNorm) and the backbone has no final
            # norm, so the side has none either.
            d_side = cfg.hidden_size
            norm = nn.Identity()
        for m in [*side_blocks, norm]:
            family_init(bb.model, cfg, m)
        self.stacks[name] = SideStack(bb.hidden_size, d_side, len(blocks), keep, side_blocks, norm,
                                      mc.dropout, mc.gate_temperature, mc.tap_storage)

    # -- pruned-weight initialisation (docs/methods/lst.md §8) ----------------------------------------------------------------
    def init_from_importance(self, importance) -> dict:
        """Re-initialise the side blocks and final norms from the pruned backbone.

        `importance(name, param)` gives I for a backbone parameter (same shape); magnitude uses |θ|,
        Fisher the accumulated squared gradients. Returns (and keeps in `pruning_records`) the index
        sets: side parameter name → (backbone parameter name, rows, cols).
        """
        pr = Pruner(self, importance)
        bb = self.backbone
        model = bb.model
        for name, stack in self.stacks.items():
            d_side = stack.ladders["embed"].out_features
            if self.family == "t5":
                stack_model = getattr(model, name)
                emb, blocks, final = model.shared.weight, stack_model.block, stack_model.final_layer_norm
            elif self.family == "llama":
                emb, blocks, final = bb.decoder.embed_tokens.weight, bb.blocks, bb.decoder.norm
            elif self.family == "vit":
                emb, blocks, final = model.embeddings.patch_embeddings.projection.weight, bb.blocks, model.layernorm
            else:
                emb, blocks, final = model.embeddings.word_embeddings.weight, bb.blocks, None
            P = embedding_dims(pr.imp(emb), d_side)
            side_blocks = {i: stack.block(i) for i in stack.keep}
            P = pr.stack(self.family, blocks, side_blocks, P)
            if final is not None:
                pr.vector(stack.norm, final, P)
            if self.family == "t5":
                table = "layer.0.SelfAttention.relative_attention_bias.weight"
                pr.copy(stack.block(stack.keep[0]).get_parameter(table), blocks[0].get_parameter(table))
        self.pruning_records = pr.records
        return pr.records

    def initialize_from_fisher(self, batches, samples: int | None = None) -> int:
        """Fisher pruning init (docs/methods/lst.md §8, the paper scripts' default).

        `batches`: an iterable of training batches with true `labels` (any batch size: each is split
        into single examples). Runs exactly `samples` (default `fisher_samples`) single-example backward
        passes through the full pretrained model, accumulates (∂ℓ/∂θ)² per backbone weight and redoes
        the pruning with that importance. The backbone is left unchanged. For classification the loss
        goes through this model's (new) head on the backbone's pooled features, since the pretrained
        model has no task head; causal LMs use the frozen LM head. Returns the number of examples used
        (fewer than `samples` only if `batches` runs out, with a warning).
        """
        n = samples or self.method_config.fisher_samples
        fisher, used = fisher_importance(self, batches, n)
        self.init_from_importance(lambda name, p: fisher[name])
        self.data_init_pending = False
        return used

    def pretrained_loss(self, batch) -> torch.Tensor:
        """The full pretrained model's loss on `batch` (used for the Fisher importance)."""
        h, ctx = self.backbone(batch)
        labels = batch.get("labels")
        if self.objective == "causal-lm":
            if labels is None:
                labels = batch["input_ids"].masked_fill(batch.get("attention_mask", 1) == 0, -100)
            logits = self.backbone.lm_logits(h)
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if labels is None:
            raise ValueError("lst: Fisher initialisation needs batches with true `labels`")
        return F.cross_entropy(self.head(self.backbone.pool(h, ctx)).float(), labels)

    # -- the frozen trunk ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def backbone_taps(self, batch):
        """Backbone pass without autograd. Returns (taps, ctx): taps[stack] = {"embed": e (B×T×d),
        i: output of block i (B×T×d) for i in K}. T5 adds the decoder stack and ctx["memory"].

        Bert/vit/llama with a trunk cache (training): the block outputs are replayed from it where stored, and
        padded rows of the taps are zero (the cache keeps real rows only; real rows are the same either way,
        since real tokens never attend to padded keys).
        """
        bb = self.backbone
        if self.family == "t5":
            with trunk_eval_mode(bb, not self.method_config.trunk_dropout):
                return self._t5_taps(batch)
        keep = self.output_stack.keep
        with trunk_eval_mode(bb, not self.method_config.trunk_dropout):
            h, ctx = bb.embed(batch)
            mask = ctx.get("token_mask")
            cache = self.trunk_cache if self.training else None
            real = (None if cache is None or mask is None or bool(mask.all())
                    else mask.to(h.dtype).unsqueeze(-1))     # B×T×1

            def zero_padded(t):
                return t if real is None else t * real

            def compute():                                   # [h_i for i in K], each B×T×d
                x, outs = h, []
                for i in range(keep[-1] + 1):
                    x = bb.run_block(i, x, ctx)
                    if i in keep:
                        outs.append(zero_padded(x))
                return outs

            outs = cached_trunk(cache, batch, mask, bb.input_keys, compute, h)
        taps = {"embed": zero_padded(h), **dict(zip(keep, outs))}
        return {self._single_name: taps}, ctx

    @property
    def _single_name(self):
        return "decoder" if self.family == "llama" else "encoder"

    def _t5_taps(self, batch):
        enc, ctx = self.encoder_taps(batch)
        return {"encoder": enc, "decoder": self.decoder_taps(batch, ctx)}, ctx

    @torch.no_grad()
    def encoder_taps(self, batch):
        """T5 backbone encoder without autograd: ({"embed": e, i: h_i for i in K}, ctx with "memory")."""
        bb = self.backbone
        h, ctx = bb.embed(batch)
        # W0 reads e itself, before the backbone's embedding dropout (docs/methods/lst.md §3: an independent draw).
        taps = {"embed": bb.model.encoder.embed_tokens(batch["input_ids"])}
        keep = self.stacks["encoder"].keep
        for i in range(bb.num_layers):              # to the end: the backbone decoder reads the output
            h = bb.run_block(i, h, ctx)
            if i in keep:
                taps[i] = h
        ctx["memory"] = bb.finish_encoder(h)        # B×Ts×d
        return taps, ctx

    @torch.no_grad()
    def decoder_taps(self, batch, ctx):
        """T5 backbone decoder (teacher-forced, cross-attending to ctx["memory"]) without autograd."""
        bb = self.backbone
        g, dctx = bb.decoder_embed(batch, ctx["memory"], ctx["token_mask"])
        taps = {"embed": bb.model.decoder.embed_tokens(bb.decoder_ids(batch))}
        keep = self.stacks["decoder"].keep
        for i in range(keep[-1] + 1):
            g = bb.run_decoder_block(i, g, dctx)
            if i in keep:
                taps[i] = g
        return taps

    # -- the side network -----------------------------------------------------------------------------------------
    def side_forward(self, taps, ctx, consume: bool = False) -> torch.Tensor:
        """The trainable path on (detached) taps: B×T×d up-projected side output (T5: decoder's).

        consume=True removes each tap from `taps` once its ladder has read it, so a tap that the ladder
        keeps in a compact form (tap_storage bf16/int8) is freed during the forward."""
        if self.family == "t5":
            s_enc = self.side_encode(taps["encoder"], ctx)
            return self.side_decode(taps["decoder"], s_enc, ctx)
        name = self._single_name
        stack, taps = self.stacks[name], taps[name]
        take = taps.pop if consume else taps.__getitem__
        s = stack.start(take("embed"))                                       # B×T×d'
        sctx = self._side_context(s, ctx)
        for i in stack.keep:
            s = self._run_side_block(stack.block(i), stack.fuse(i, s, take(i)), sctx)
        return self.up(stack.finish(s))                                      # B×T×d

    @torch.no_grad()
    def _side_context(self, s, ctx):
        cfg = self.side_configs[self._single_name]
        if self.family == "bert":
            out = {"mask": create_bidirectional_mask(config=cfg, inputs_embeds=s, attention_mask=ctx["token_mask"])}
            if "position_bias" in ctx:
                # MPNet: H is kept (side_heads is refused), so the backbone's B×H×T×T bias fits the side heads.
                out["position_bias"] = ctx["position_bias"]
            return out
        if self.family == "llama":
            pos = ctx["position_ids"]
            return {"mask": create_causal_mask(config=cfg, inputs_embeds=s, attention_mask=ctx["token_mask"],
                                               past_key_values=None, position_ids=pos),
                    "rope": self.rotary(s, pos), "pos": pos}
        return {}

    def _run_side_block(self, block, s, sctx):
        if self.family == "bert":
            if "position_bias" in sctx:
                return block(s, sctx["mask"], sctx["position_bias"])[0]
            out = block(s, attention_mask=sctx["mask"])
            return out[0] if isinstance(out, tuple) else out
        if self.family == "llama":
            return block(s, attention_mask=sctx["mask"], position_embeddings=sctx["rope"], position_ids=sctx["pos"])
        return block(s)

    def side_encode(self, taps, ctx) -> torch.Tensor:
        """T5 side encoder: s_enc = drop(Norm_side_enc(s)), B×Ts×d'."""
        stack = self.stacks["encoder"]
        s = stack.start(taps["embed"])
        with torch.no_grad():
            mask = create_bidirectional_mask(config=self.side_configs["encoder"], inputs_embeds=s,
                                             attention_mask=ctx["token_mask"])
        bias = None                                  # B×H×Ts×Ts, made by the first kept side block
        for i in stack.keep:
            s, bias, _ = stack.block(i)(stack.fuse(i, s, taps[i]), mask, bias)
        return stack.finish(s)

    def side_decode(self, taps, s_enc, ctx, cache=None) -> torch.Tensor:
        """T5 side decoder: cross-attends to s_enc only. Returns o = W_up·drop(Norm(s_dec)) + b_up, B×Tt×d."""
        stack = self.stacks["decoder"]
        cfg = self.side_configs["decoder"]
        s = stack.start(taps["embed"])
        with torch.no_grad():
            self_mask = create_causal_mask(config=cfg, inputs_embeds=s, attention_mask=None,
                                           past_key_values=cache.self_attention_cache if cache is not None else None)
            cross_mask = create_bidirectional_mask(config=cfg, inputs_embeds=s, attention_mask=ctx["token_mask"],
                                                   encoder_hidden_states=s_enc)
        bias = cross_bias = None
        for i in stack.keep:
            s, bias, cross_bias = stack.block(i)(stack.fuse(i, s, taps[i]), self_mask, bias, s_enc, cross_mask,
                                                 cross_bias, past_key_values=cache)
        return self.up(stack.finish(s))

    # -- MemtuneModel --------------------------------------------------------------------------------------------
    def features(self, batch):
        if self.training and self.data_init_pending:
            warnings.warn("lst: init='fisher' but initialize_from_fisher(batches) was not called; "
                          "training starts from the magnitude-pruned side network", stacklevel=2)
            self.data_init_pending = False
        taps, ctx = self.backbone_taps(batch)
        out = self.side_forward(taps, ctx, consume=True)                     # B×T×d
        if self.objective == "causal-lm":
            return out
        return self.backbone.pool(out, ctx)

    # -- T5 text-to-text -------------------------------------------------------------------------------------------
    def lm_logits(self, o: torch.Tensor) -> torch.Tensor:
        """T5: logits = LMHead_frozen(o·d^-1/2) through the tied input embedding (docs/methods/lst.md §4). B×Tt×V."""
        from .generate import t5_lm_logits

        return t5_lm_logits(self, o)

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, num_beams: int = 1,
                 stop_at_eos: bool = True):
        """T5 text-to-text decoding with the LST output (greedy, or beam search with num_beams > 1).
        Returns B×(1+n) ids starting with the decoder start token."""
        from .generate import t5_generate

        return t5_generate(self, input_ids, attention_mask, max_new_tokens, num_beams, stop_at_eos)

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
  the start position (the backbone's own pooling), through a new linear head. Text-to-text (seq2seq): the
  up-projected side decoder states go through the tied LM head, LMHead(o·d^-1/2) (`lm_logits`); `generate`
  decodes greedily or with beam search, with KV caches for the backbone decoder and the side decoder.

- swin (hierarchical: stages of width C_s; docs/methods/lst.md "Swin"): a staged side network. Side blocks of
  stage s are d'_s wide, ladder i reads block i's in-stage output (before the stage transition: C_s → d'_s),
  and a trainable side patch merging follows the last side position of each stage (kept or not); W_up maps the
  last stage's d' to C_last and the features are the backbone's mean over all tokens.

- LST-VL (backbones with "visual_side_tokens", `backbones/image_text.py`; docs/methods/vl.md §2): the backbone sees the
  text only; the side encoder reads s = W0·drop([e ; e_v]) over T+V positions, e_v = the trainable visual
  embedding of the frozen visual tokens (visual.py), with ladders zero at the visual positions; the T5 side
  decoder cross-attends to all T+V side encoder positions. `generate` takes the images (pixel_values, and
  pixel_values_2 for two-image examples: V = 2·grid², image ids [0]×grid² + [1]×grid²) and decodes greedily or
  with beams, the side encoder output, its mask and the side KV cache following the beams (generate.py).

W0 reads e with one dropout draw: for T5 the raw embedding e with the side's own draw (the backbone's
embedding dropout is separate, as in §3); for the other families the embedding output as the backbone's
`embed` returns it. HF embedding modules apply their dropout inside (BERT 0.1, ViT/DINOv2 0, Llama none), so
when the trunk runs in training mode with a dropout, W0 reads that draw and adds none (`trunk_dropout=false`,
an eval-mode trunk: the side's own draw).

The backbone blocks after the last kept layer are not run (their outputs would not be read); T5's
encoder always runs to the end because the backbone decoder cross-attends to its output.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ConfigError, MemtuneModel, check
from ..common.trunk_cache import cached_trunk, check_trunk_deterministic, trunk_eval_mode
from .fisher import fisher_importance
from .prune import Pruner, embedding_dims
from .side import SideStack, small_normal_
from .visual import VisualSideEmbedding


def side_stacks(backbone) -> dict[str, bool]:
    """Side stack name → whether it mirrors the backbone's decoder stack (the second stack of an
    encoder-decoder). A single-stack backbone has one side stack, named after its kind."""
    if backbone.is_encoder_decoder:
        return {"encoder": False, "decoder": True}
    return {"decoder" if "decoder" in backbone.capabilities else "encoder": False}


def in_stage_outputs(backbone, h, ctx, keep) -> list[torch.Tensor]:
    """A staged backbone's blocks 0..max(K) from its embedding output h: [output of block i before the stage
    transition that may follow it, B×T_s×C_s, for i in K]. The caller disables autograd."""
    want, outs = set(keep), []
    for i in range(max(keep) + 1):
        h = backbone.run_block_in_stage(i, h, ctx)
        if i in want:
            outs.append(h)
        if i < max(keep):
            h = backbone.stage_transition(i, h, ctx)
    return outs


class LSTModel(MemtuneModel):
    visual_path = True           # LST-VL: visual tokens enter the side encoder only (mode A)
    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        self._check_options(backbone, config)
        ref = next(backbone.parameters())
        self.stacks = nn.ModuleDict()
        self.side_configs: dict = {}
        self.mirrors_decoder = side_stacks(backbone)             # side stack name → mirrors the decoder stack
        self.staged = "stages" in backbone.capabilities          # per-stage side widths and side transitions
        depth = min(len(self._backbone_blocks(name)) for name in self.mirrors_decoder)
        keep = config.kept(depth)                                # T5: the same K in both stacks
        with torch.device(ref.device):
            for name in self.mirrors_decoder:
                self._add_stack(name, keep)
            self.rotary = backbone.make_side_rotary(self.side_configs[self._output_name])
            d_side = self.output_stack.out_width
            self.up = small_normal_(nn.Linear(d_side, backbone.hidden_size))     # W_up: d' → d (staged: last stage's)
            # LST-VL (docs/methods/vl.md §2): visual tokens join the side encoder only, after its text positions.
            self.visual = (self._visual_embedding(backbone, d_side) if "visual_side_tokens" in backbone.capabilities
                           else None)
        self.stacks.to(ref.dtype)
        self.up.to(ref.dtype)
        if self.visual is not None:
            self.visual.to(ref.dtype)
        self.data_init_pending = config.init == "fisher"
        self.pruning_records: dict = {}
        if config.init != "random" and ref.device.type != "meta":   # meta: shapes only, nothing to copy
            self.init_from_importance(lambda name, p: p.detach().abs())
        self.trunk_cache = config.make_trunk_cache()

    @staticmethod
    def _visual_embedding(backbone, d_side: int, factorised: bool = True) -> VisualSideEmbedding:
        """The trainable visual embedding: to width d, read by W0 with the text (factorised, the official
        form), or straight to d' (see visual.py)."""
        if "decoder" in backbone.capabilities:
            raise ConfigError(f"lst: visual side tokens are implemented for encoder and encoder-decoder text "
                              f"backbones (BERT-like, T5), not the {backbone.family} decoder")
        width = backbone.hidden_size if factorised else d_side
        return VisualSideEmbedding(backbone.visual_width, width, backbone.visual_length, factorised)

    def _check_options(self, backbone, config):
        config.check_side_heads(backbone, exact=False)
        if config.cache_trunk:
            check(not backbone.is_encoder_decoder,
                  f"lst.cache_trunk is supported for single-stack backbones, not {backbone.family}")
            check("stages" not in backbone.capabilities,
                  f"lst.cache_trunk is not supported on {backbone.family}: its taps change width and token count "
                  f"from stage to stage, and the trunk cache stores one width; leave cache_trunk off")
            check_trunk_deterministic("lst", [backbone], config.trunk_dropout)

    @property
    def side_attention(self) -> str:
        """The side blocks' kernel after resolving "auto": sdpa where the side block class has a fused path."""
        return self.method_config.side_kernel(self.backbone)

    # -- construction ----------------------------------------------------------------------------------------
    @property
    def _output_name(self) -> str:
        return "decoder" if "decoder" in self.mirrors_decoder else "encoder"

    @property
    def output_stack(self) -> SideStack:
        return self.stacks[self._output_name]

    def _backbone_blocks(self, name: str) -> nn.ModuleList:
        bb = self.backbone
        return bb.decoder_blocks if self.mirrors_decoder[name] else bb.blocks

    def _side_config(self, name, keep):
        """The side config of stack `name` whose blocks mirror backbone layers `keep` (None: all)."""
        bb, mc = self.backbone, self.method_config
        attention, dropout = self.side_attention, mc.side_dropout(bb)
        return bb.side_config(bb.stack_config(self.mirrors_decoder[name]), mc.r, keep=keep, dropout=dropout,
                              attention=attention, attention_dropout=mc.side_attention_dropout(attention, dropout),
                              heads=mc.side_heads)

    def _add_stack(self, name, keep):
        bb, mc = self.backbone, self.method_config
        decoder = self.mirrors_decoder[name]
        dropout = mc.side_dropout(bb)
        cfg = self._side_config(name, keep)
        self.side_configs[name] = cfg
        side_blocks = [bb.make_side_block(cfg, j, decoder) for j in range(len(keep))]
        norm = bb.side_norm(cfg.hidden_size, cfg)
        d, d_side, widths, transitions = bb.hidden_size, cfg.hidden_size, None, {}
        if self.staged:
            # Ladder i: C_s → d'_s of block i's stage; W0: the embedding output (C_0) → d'_0.
            widths = tuple(zip(bb.block_widths, bb.side_block_widths(cfg)))
            d, d_side = widths[0]
            transitions = bb.make_side_transitions(cfg)
        for m in [*side_blocks, norm, *transitions.values()]:
            bb.init_side_weights(m, cfg)
        self.stacks[name] = SideStack(d, d_side, len(self._backbone_blocks(name)), keep, side_blocks, norm, dropout,
                                      mc.gate_temperature, mc.tap_storage, widths, transitions)

    # -- pruned-weight initialisation (docs/methods/lst.md §8) ------------------------------------------------
    def init_from_importance(self, importance) -> dict:
        """Re-initialise the side blocks and final norms from the pruned backbone.

        `importance(name, param)` gives I for a backbone parameter (same shape); magnitude uses |θ|,
        Fisher the accumulated squared gradients. Returns (and keeps in `pruning_records`) the index
        sets: side parameter name → (backbone parameter name, rows, cols).
        """
        pr = Pruner(self, importance)
        bb = self.backbone
        for name, stack in self.stacks.items():
            blocks = self._backbone_blocks(name)
            final = bb.decoder_norm if self.mirrors_decoder[name] else bb.final_norm
            P = embedding_dims(pr.imp(bb.pruning_embedding), stack.ladders["embed"].out_features)
            templates, transitions = {}, {}
            if self.staged:                     # side widths change per stage; the chain crosses the merges
                templates = self._pruning_templates(name, stack)
                transitions = {i: (merge, stack.transition(i), bb.merge_pruning)
                               for i, merge in bb.stage_merges().items()}
            P = pr.stack(bb, blocks, {i: stack.block(i) for i in stack.keep}, P, templates, transitions)
            if final is not None:
                pr.vector(stack.norm, final, P)
            for table in bb.side_shared_tables:
                pr.copy(stack.block(stack.keep[0]).get_parameter(table), blocks[0].get_parameter(table))
            for table in bb.side_block_tables:                     # per-block tables, copied whole
                for i in stack.keep:
                    pr.copy(stack.block(i).get_parameter(table), blocks[i].get_parameter(table))
        self.pruning_records = pr.records
        return pr.records

    def _pruning_templates(self, name, stack) -> dict[int, nn.Module]:
        """Meta-device side blocks with the shapes of the side blocks that dropped layers would have (the chain
        runs through them at their stage's side width)."""
        cfg = self._side_config(name, None)
        with torch.device("meta"):
            return {i: self.backbone.make_side_block(cfg, i) for i in range(len(self._backbone_blocks(name)))
                    if i not in stack.keep}

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
        """The full pretrained model's loss on `batch` (used for the Fisher importance): the LM loss through
        the frozen LM head for causal LMs and seq2seq (decoder fed the shifted targets), else the new head's."""
        labels = batch.get("labels")
        if self.objective == "seq2seq":
            if labels is None:
                raise ValueError("lst: Fisher initialisation needs batches with target `labels`")
            h, _ = self.backbone({**batch, "decoder_input_ids": self.backbone.shift_right(labels)})
            return self.lm_loss(self.lm_logits(h), labels)
        h, ctx = self.backbone(batch)
        if self.objective == "causal-lm":
            if labels is None:
                labels = batch["input_ids"].masked_fill(batch.get("attention_mask", 1) == 0, -100)
            logits = self.backbone.lm_logits(h)
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if labels is None:
            raise ValueError("lst: Fisher initialisation needs batches with true `labels`")
        return self.head_loss(self.head(self.backbone.pool(h, ctx)), labels)

    # -- the frozen trunk ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def backbone_taps(self, batch):
        """Backbone pass without autograd. Returns (taps, ctx): taps[stack] = {"embed": e (B×T×d),
        i: output of block i (B×T×d) for i in K}. Encoder-decoders add the decoder stack and ctx["memory"].

        Single-stack backbones with a trunk cache (training): the block outputs are replayed from it where
        stored, and padded rows of the taps are zero (the cache keeps real rows only; real rows are the same
        either way, since real tokens never attend to padded keys).
        """
        bb = self.backbone
        with trunk_eval_mode(bb, not self.method_config.trunk_dropout):
            if bb.is_encoder_decoder:
                enc, ctx = self.encoder_taps(batch)
                return {"encoder": enc, "decoder": self.decoder_taps(batch, ctx)}, ctx
            keep = self.output_stack.keep
            h, ctx = bb.embed(batch)
            # A trunk in training mode returns its embedding after the family's own embedding dropout (BERT, ViT,
            # GPT-2: the blocks' rate): W0 then reads that draw instead of dropping e a second time.
            ctx["embed_dropped"] = bb.training and bb.hidden_dropout > 0
            mask = ctx.get("token_mask")
            cache = self.trunk_cache if self.training else None
            real = (None if cache is None or mask is None or bool(mask.all())
                    else mask.to(h.dtype).unsqueeze(-1))     # B×T×1

            def compute():                                   # [h_i for i in K], each B×T×d
                if self.staged:
                    return in_stage_outputs(bb, h, ctx, keep)
                return bb.forward_intermediates(h, ctx, keep, row_mask=real)[1]

            outs = cached_trunk(cache, batch, mask, bb.input_keys, compute, h)
        taps = {"embed": h if real is None else h * real, **dict(zip(keep, outs))}
        if self.visual is not None:                  # LST-VL: frozen visual tokens B×V×d_v, side only
            taps["visual"] = bb.visual_tokens(batch)
        return {self._output_name: taps}, ctx

    @torch.no_grad()
    def encoder_taps(self, batch):
        """Encoder stack of an encoder-decoder without autograd: ({"embed": e, i: h_i for i in K}, ctx with
        "memory", the finished encoder output B×Ts×d)."""
        bb = self.backbone
        h, ctx = bb.embed(batch)
        # W0 reads e itself, before the backbone's embedding dropout (docs/methods/lst.md §3: an independent draw).
        taps = {"embed": bb.raw_embedding(batch["input_ids"])}
        keep = self.stacks["encoder"].keep
        # To the end: the backbone decoder reads the output.
        h, outs = bb.forward_intermediates(h, ctx, keep, stop=bb.num_layers)
        taps.update(zip(keep, outs))
        ctx["memory"] = bb.finish_encoder(h)        # B×Ts×d
        if self.visual is not None:                  # LST-VL: frozen visual tokens B×V×d_v, side only
            taps["visual"] = bb.visual_tokens(batch)
        return taps, ctx

    @torch.no_grad()
    def decoder_taps(self, batch, ctx, cache=None):
        """Decoder stack of an encoder-decoder (teacher-forced on the batch's decoder ids, cross-attending to
        ctx["memory"]) without autograd: {"embed": e, i: g_i for i in K}. cache: the backbone decoder's KV
        cache when decoding new tokens."""
        bb = self.backbone
        g, dctx = bb.decoder_embed(batch, ctx["memory"], ctx["token_mask"], cache)
        taps = {"embed": bb.raw_embedding(bb.decoder_ids(batch), decoder=True)}
        keep = self.stacks["decoder"].keep
        _, outs = bb.forward_intermediates(g, dctx, keep, decoder=True)
        taps.update(zip(keep, outs))
        return taps

    # -- the side network -----------------------------------------------------------------------------------------
    def _run_stack(self, name: str, taps: dict, make_context, consume: bool = False,
                   embed_dropped: bool = False) -> torch.Tensor:
        """Side stack `name` on its taps: s = W0·drop(e), then ladder + side block for each kept layer;
        returns drop(Norm_side(s)), B×T×d'. make_context(s) gives the side blocks' context. embed_dropped: e
        is the backbone's embedding output in training mode, which already applied its embedding dropout."""
        bb, stack = self.backbone, self.stacks[name]
        take = taps.pop if consume else taps.__getitem__
        if "visual" in taps:
            s = self._side_input_with_visual(stack, take("embed"), take("visual"))   # B×(T+V)×d'
        else:
            s = stack.start(take("embed"), drop=not embed_dropped)           # B×T×d'
        sctx = make_context(s)
        for i in stack.steps:                      # the kept layers (and, staged, the ends of stages) in order
            if stack.has_block(i):
                # LST-VL: the ladder (B×T×d') is zero at the visual positions (SideStack.fuse pads it).
                s = bb.run_side_block(stack.block(i), stack.fuse(i, s, take(i)), sctx)
            if stack.transition(i) is not None:    # staged: to the next stage's grid and side width
                s = bb.run_side_transition(stack.transition(i), s, sctx)
        return stack.finish(s)

    def _side_input_with_visual(self, stack, e, v) -> torch.Tensor:
        """e: text embedding B×T×d, v: frozen visual tokens B×V×d_v → the side input B×(T+V)×d':
        W0·drop([e ; e_v]) (factorised) or [W0·drop(e) ; drop(e_v)]."""
        e_v = self.visual(v).to(e.dtype)
        if self.visual.factorised:
            return stack.start(torch.cat([e, e_v], dim=1))
        return torch.cat([stack.start(e), stack.drop(e_v)], dim=1)

    @staticmethod
    def _side_memory_mask(token_mask, s_enc) -> torch.Tensor:
        """The side decoder's cross-attention mask: the text mask B×T, then ones at the side encoder's visual
        positions (LST-VL: s_enc is B×(T+V)×d')."""
        extra = s_enc.shape[1] - token_mask.shape[1]
        if extra <= 0:
            return token_mask
        return torch.cat([token_mask, token_mask.new_ones(token_mask.shape[0], extra)], dim=1)

    def side_forward(self, taps, ctx, consume: bool = False) -> torch.Tensor:
        """The trainable path on (detached) taps: B×T×d up-projected side output (encoder-decoders: the
        decoder's).

        consume=True (single stack) removes each tap from `taps` once its ladder has read it, so a tap that
        the ladder keeps in a compact form (tap_storage bf16/int8) is freed during the forward."""
        if self.backbone.is_encoder_decoder:
            s_enc = self.side_encode(taps["encoder"], ctx)
            return self.side_decode(taps["decoder"], s_enc, ctx)
        name, cfg = self._output_name, self.side_configs[self._output_name]
        return self.up(self._run_stack(name, taps[name], lambda s: self.backbone.side_context(s, ctx, cfg, self.rotary),
                                       consume, ctx.get("embed_dropped", False)))   # B×T×d

    def side_encode(self, taps, ctx) -> torch.Tensor:
        """Side encoder: s_enc = drop(Norm_side_enc(s)), B×Ts×d'."""
        cfg = self.side_configs["encoder"]
        return self._run_stack("encoder", taps, lambda s: self.backbone.side_context(s, ctx, cfg))

    def side_decode(self, taps, s_enc, ctx, cache=None) -> torch.Tensor:
        """Side decoder: cross-attends to s_enc only. Returns o = W_up·drop(Norm(s_dec)) + b_up, B×Tt×d.
        cache: the side decoder's own KV cache when decoding new tokens."""
        cfg = self.side_configs["decoder"]
        memory_mask = self._side_memory_mask(ctx["token_mask"], s_enc)
        return self.up(self._run_stack("decoder", taps, lambda s: self.backbone.side_decoder_context(
            s, s_enc, memory_mask, cfg, cache)))

    # -- MemtuneModel --------------------------------------------------------------------------------------------
    def features(self, batch):
        if self.training and self.data_init_pending:
            warnings.warn("lst: init='fisher' but initialize_from_fisher(batches) was not called; "
                          "training starts from the magnitude-pruned side network", stacklevel=2)
            self.data_init_pending = False
        taps, ctx = self.backbone_taps(batch)
        out = self.side_forward(taps, ctx, consume=True)                     # B×T×d
        if self.per_token:
            return out
        return self.backbone.pool(out, ctx)

    # -- text-to-text (encoder-decoders) ----------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, num_beams: int = 1,
                 stop_at_eos: bool = True, pixel_values=None, pixel_values_2=None):
        """Text-to-text decoding with the LST output (greedy, or beam search with num_beams > 1).
        Returns B×(1+n) ids starting with the decoder start token. LST-VL: pixel_values B×3×S×S (and
        pixel_values_2 for a second image) go to the side encoder with the text."""
        from .generate import text_to_text_generate

        visual = {k: v for k, v in (("pixel_values", pixel_values), ("pixel_values_2", pixel_values_2))
                  if v is not None}
        if self.visual is None and visual:
            raise ConfigError("lst.generate: pixel_values given, but this model reads text only (it is not on an "
                              "image-text composition)")
        if self.visual is not None and "pixel_values" not in visual:
            raise ConfigError("lst.generate on an image-text model needs pixel_values (B×3×S×S) beside the text "
                              "(or decode through the forward: memtune.seq2seq.greedy_generate)")
        return text_to_text_generate(self, input_ids, attention_mask, max_new_tokens, num_beams, stop_at_eos,
                                     visual)

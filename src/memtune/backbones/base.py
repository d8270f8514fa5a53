"""The backbone protocol: one small adapter per model family.

Every method reaches the pretrained model only through these few calls, so a new family is one file:

    h, ctx = backbone.embed(batch)          # h: B×T×d, ctx: masks, position biases, ... for the blocks
    for i in range(backbone.num_layers):
        h = backbone.run_block(i, h, ctx)   # block i of the (encoder) stack
    h = backbone.finish(h, ctx)             # final norm (and for T5: the decoder pass)
    feats = backbone.pool(h, ctx)           # B×feature_size, for classification heads

`ctx` is a plain dict, so a method may add its own entries (it is rebuilt on every `embed`).
Methods that run part of the stack and keep some outputs use `forward_intermediates` (or
`iter_blocks` when they act between blocks) instead of writing the loop themselves.

Optional capabilities are declared, not inferred from the family name: `is_encoder_decoder` (a second,
decoder stack: `decoder_blocks`, `run_decoder_block`, ...), `norm_position` ("pre" or "post" LayerNorm
blocks), `token_layout` ("grid" when the last rows·cols tokens are an image's patch grid: `grid_tokens`).
"""
from __future__ import annotations

import bisect
import copy
from typing import Any, ClassVar

import torch
from torch import nn

Context = dict[str, Any]


class UnsupportedModel(ValueError):
    """The model's family (or a feature of it) is not supported; the message lists what is."""


def take_indices(num_blocks: int, indices, what: str = "block indices", error: type[Exception] = ValueError
                 ) -> tuple[int, ...]:
    """Check 0-based block indices against a stack of `num_blocks`; returns them sorted, without repeats.

    `what` names the option in the message (e.g. "dtl.add_blocks"); `error` is the exception class raised."""
    idx = tuple(sorted(set(int(i) for i in indices)))
    bad = [i for i in idx if not 0 <= i < num_blocks]
    if bad:
        raise error(f"{what}: block(s) {bad} out of range for this {num_blocks}-block model "
                    f"(allowed: 0..{num_blocks - 1})")
    return idx


def residual_sublayer(x: torch.Tensor, branch, norm, position: str, branch_hook=None) -> torch.Tensor:
    """One residual sub-layer, B×T×d → B×T×d: pre-norm x + branch(norm(x)), post-norm norm(x + branch(x)).

    `branch` includes its own dropout; `branch_hook(branch_input, branch_output) -> branch_output` (MEFT's
    adapters) edits it before the residual, where branch_input is norm(x) (pre) or x itself (post)."""
    n = norm(x) if position == "pre" else x
    u = branch(n)
    if branch_hook is not None:
        u = branch_hook(n, u)
    return x + u if position == "pre" else norm(x + u)


# A capability's absence in words, for the refusals of the methods that need it (Backbone.why_lacking).
CAPABILITY_GAPS = {
    "encoder": "it is not one bidirectional encoder stack",
    "decoder": "it is not one causal decoder stack",
    "single_stack": "it has two stacks, an encoder and a decoder",
    "encoder_decoder": "it has no decoder stack beside an encoder",
    "sublayers": "its blocks are not exposed as an attention and a feed-forward residual sub-layer",
    "decoder_sublayers": "it has no decoder blocks with self-attention, cross-attention and feed-forward sub-layers",
    "side_network": "it has no side-network hooks (narrow copies of its own blocks)",
    "stages": "it has no hierarchical stages",
    "one_width": "its width changes from stage to stage, and the method's modules have one width d",
    "visual_side_tokens": "it is not an image-text composition",
}


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
    # True when a decoder stack follows the encoder (`decoder_blocks`, `decoder_embed`, `run_decoder_block`,
    # `finish_encoder`, `finish_decoder`); the protocol's `blocks` are then the encoder's.
    is_encoder_decoder: ClassVar[bool] = False
    # What the family offers, for methods to require (MethodConfig.requires): "encoder" (one bidirectional
    # stack), "decoder" (one causal stack), "encoder_decoder", "single_stack" (encoder or decoder),
    # "sublayers" (attention_sublayer / ffn_sublayer), "decoder_sublayers" (an encoder-decoder's self-attention,
    # cross-attention and FFN sub-layers), "side_network" (the side-network hooks LST and QST use), "stages"
    # (hierarchical stages with their own width and grid, below), "one_width" (every block has the same width d:
    # granted from `one_width` below, not listed by hand).
    capabilities: ClassVar[frozenset[str]] = frozenset()
    # False for hierarchical backbones whose width changes per stage (Swin); they then lack "one_width", which
    # the methods whose side modules have one width d require.
    one_width: ClassVar[bool] = True
    # Why this family (or this model of it) lacks a capability, where the reason is its own (a parallel
    # residual, an embedding narrower than the blocks); `why_lacking` falls back to CAPABILITY_GAPS.
    gaps: ClassVar[dict[str, str]] = {}
    # Where each block normalises: "post" (x → LN(x + branch(x)), BERT) or "pre" (x + branch(Norm(x))).
    norm_position: ClassVar[str] = "pre"
    # "sequence", or "grid" when the last rows·cols tokens form the patch grid ctx["grid"] = (rows, cols).
    token_layout: ClassVar[str] = "sequence"

    # Config fields of the blocks' residual dropout and FFN activation (adapters that a method adds match them).
    dropout_field: ClassVar[str] = "hidden_dropout_prob"
    activation_field: ClassVar[str] = "hidden_act"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        declared = frozenset(cls.capabilities)
        cls.capabilities = (declared | {"one_width"}) if cls.one_width else (declared - {"one_width"})

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def why_lacking(self, capability: str) -> str:
        """What a method needing `capability` would miss here, in words (for its refusal)."""
        return self.gaps.get(capability) or CAPABILITY_GAPS.get(capability, f"it lacks {capability!r}")

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

    @property
    def hidden_dropout(self) -> float:
        """The blocks' residual dropout probability (0 where the family has none, e.g. Llama)."""
        return float(getattr(self.config, self.dropout_field, 0.0) or 0.0)

    @property
    def activation(self) -> str:
        """Name of the feed-forward activation (transformers' ACT2FN key)."""
        return getattr(self.config, self.activation_field, "gelu")

    # -- stages: blocks grouped by width (hierarchical backbones, e.g. Swin) ----------------------------
    # Most families keep one width d and one token grid through every block: one stage. A hierarchical one
    # groups its blocks into stages of their own width and grid, joined by a frozen transition (Swin: patch
    # merging, tokens /4, width x2). The blocks stay one flat list in stage order, and `run_block(i)` includes
    # the transition after the last block of a stage, so a loop over run_block is still the whole stack:
    #     run_block(i, h, ctx) == stage_transition(i, run_block_in_stage(i, h, ctx), ctx)
    # A method that acts on a block's output before the transition (DTL's add-backs) uses the two parts.
    @property
    def block_widths(self) -> tuple[int, ...]:
        """Width of each block's input and (in-stage) output."""
        return (self.hidden_size,) * self.num_layers

    @property
    def stage_starts(self) -> tuple[int, ...]:
        """Index of the first block of each stage (the blocks of a stage share one width and token grid)."""
        return (0,)

    def stage_of(self, i: int) -> int:
        """The stage of block i."""
        return bisect.bisect_right(self.stage_starts, i) - 1

    def stage_grid(self, stage: int, ctx: Context) -> tuple[int, int]:
        """(rows, cols) of the patch grid the blocks of `stage` see (grid layouts)."""
        return ctx["grid"]

    def run_block_in_stage(self, i: int, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Block i without the stage transition that may follow it: B×T_s×d_s → B×T_s×d_s."""
        return self.run_block(i, h, ctx)

    def stage_transition(self, i: int, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The frozen map from block i's output into the next stage; the identity unless block i ends one."""
        return h

    # -- the protocol --------------------------------------------------------------------------
    def embed(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Context]:
        raise NotImplementedError

    def run_block(self, i: int, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        raise NotImplementedError

    @property
    def final_norm(self) -> nn.Module | None:
        """The norm `finish` applies to the (encoder) stack's output; None where there is none (post-LN)."""
        return None

    def finish(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Final norm of the stack: B×T×d → B×T×d. Encoder-decoders: the encoder output → the decoder's finished
        states B×Tt×d (the rest of the encoder-decoder pass, the decoder reading the finished encoder output)."""
        if not self.is_encoder_decoder:
            return h
        memory = self.finish_encoder(h)
        d, dctx = self.decoder_embed(ctx["batch"], memory, ctx["token_mask"])
        for i in range(len(self.decoder_blocks)):
            d = self.run_decoder_block(i, d, dctx)
        return self.finish_decoder(d)

    def pool(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Token states B×T×d → features B×feature_size. Default: mean over real tokens; causal LMs read the
        last real token (right padding assumed), the only one that has seen the whole input."""
        mask = ctx.get("token_mask")
        if self.is_causal_lm:
            last = mask.sum(1).long() - 1                    # B
            return h[torch.arange(h.shape[0], device=h.device), last]
        if mask is None:
            return h.mean(dim=1)
        m = mask.to(h.dtype).unsqueeze(-1)  # B×T×1
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def grid_tokens(self, h: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The patch-grid tokens B×(rows·cols)×d of token states h (grid layouts only)."""
        if self.token_layout != "grid":
            raise UnsupportedModel(f"{self.family} backbones have no patch grid")
        rows, cols = ctx["grid"]
        return h[:, h.shape[1] - rows * cols:]

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Finished states B×T×d → B×T×V through the frozen LM head (XForCausalLM's `lm_head`)."""
        if not (self.is_causal_lm and hasattr(self.model, "lm_head")):
            raise UnsupportedModel(f"this {self.family} model has no language-model head")
        return self.model.lm_head(h)

    def shift_right(self, targets: torch.Tensor) -> torch.Tensor:
        """Encoder-decoders' teacher forcing: target ids B×Tt (-100 at padding) → decoder inputs B×Tt, the
        decoder start token then the targets one step late, padding as the pad id (as transformers does)."""
        cfg = self.config
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id or 0
        ids = torch.full_like(targets, start)
        ids[:, 1:] = targets[:, :-1]
        return ids.masked_fill(ids == -100, cfg.pad_token_id or 0)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Context]:
        """The pretrained computation, block by block: returns finished token states and ctx."""
        h, ctx = self.embed(batch)
        h, _ = self.forward_intermediates(h, ctx, stop=self.num_layers, grad=True)
        return self.finish(h, ctx), ctx

    # -- running part of a stack ----------------------------------------------------------------------
    @property
    def output_blocks(self) -> nn.ModuleList:
        """The stack whose output `pool` reads (the decoder's for encoder-decoders)."""
        return self.decoder_blocks if self.is_encoder_decoder else self.blocks

    def _stack(self, decoder: bool):
        if not decoder:
            return self.blocks, self.run_block
        if not self.is_encoder_decoder:
            raise UnsupportedModel(f"{self.family} backbones have no decoder stack")
        return self.decoder_blocks, self.run_decoder_block

    def iter_blocks(self, h: torch.Tensor, ctx: Context, stop: int, decoder: bool = False, grad: bool = False):
        """Yield (i, output of block i), B×T×d, for blocks 0..stop-1 of the (decoder) stack, starting from its
        embedding output h. grad=False runs each block without autograd but not across the yield, so a
        caller may build a graph between blocks (the interleaved side networks)."""
        blocks, run = self._stack(decoder)
        if not 0 <= stop <= len(blocks):
            raise ValueError(f"stop={stop} is outside this {len(blocks)}-block stack (allowed: 0..{len(blocks)})")
        for i in range(stop):
            with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                h = run(i, h, ctx)
            yield i, h

    def forward_intermediates(self, h: torch.Tensor, ctx: Context, indices=(), stop: int | None = None,
                              decoder: bool = False, grad: bool = False, row_mask: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run blocks 0..stop-1 from the embedding output h (B×T×d); returns (output of the last block run,
        [output of block i for i in indices]).

        stop defaults to the last index + 1 (the blocks after it are not run; all of them without indices).
        row_mask (B×T×1, 1 for real tokens) multiplies every block output, so padded rows are exactly zero
        (a trunk cache stores real rows only; real rows never attend to padded keys, so they are unchanged).
        grad=False runs without autograd."""
        blocks, _ = self._stack(decoder)
        idx = take_indices(len(blocks), indices)
        stop = (idx[-1] + 1 if idx else len(blocks)) if stop is None else stop
        if idx and idx[-1] >= stop:
            raise ValueError(f"forward_intermediates: index {idx[-1]} is not run with stop={stop}")
        keep, outs = set(idx), []
        for i, h in self.iter_blocks(h, ctx, stop, decoder, grad):
            if row_mask is not None:
                h = h * row_mask
            if i in keep:
                outs.append(h)
        return h, outs

    # -- helpers for planners and tests -------------------------------------------------------------
    def example_batch(self, batch_size: int, length: int, device=None) -> dict[str, torch.Tensor]:
        """A batch of the right keys and shapes (all tokens real), for memory runs and tests."""
        vocab = getattr(self.config, "vocab_size", 100)
        ids = torch.randint(5, max(6, vocab), (batch_size, length), device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k in self.input_keys}

    # -- planner facts: read off a Hugging Face config, with no model built ------------------------------
    # `backbones.family_class(config)` gives the class; the planner, the loader and `memtune merge` ask it.
    # The input the family reads: "text" (token ids, a tokenizer) or "image" (pixel_values, an image processor).
    modality: ClassVar[str] = "text"
    # Config fields holding each stack's number of blocks (all set together to change the depth); the first
    # is the depth a plan reports.
    depth_fields: ClassVar[tuple[str, ...]] = ("num_hidden_layers",)
    # What `pool` computes from token states, in words, for the files that describe a merged classifier.
    pooling: ClassVar[str] = "mean over tokens where attention_mask is 1 (B×d)"

    @classmethod
    def tiny_configs(cls) -> dict:
        """Seeded-size random-weight models for tests and smoke runs: alias ("tiny-<family>") → a Hugging Face
        config (d = 64, four blocks, the character tokenizer's vocabulary for text models)."""
        return {}

    @classmethod
    def size_fields(cls, model_type: str) -> tuple[str, ...]:
        """Config fields that fix the model's size: a user's config file must name them all (transformers
        would fill in a base model's defaults for missing ones, and a plan of the wrong size is worse than
        an error)."""
        return ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")

    @classmethod
    def hf_model_class(cls):
        """The transformers class whose module the backbone wraps: XForCausalLM for the families that
        predict the next token (their LM head), the base model otherwise."""
        from transformers import AutoModel, AutoModelForCausalLM

        return AutoModelForCausalLM if cls.is_causal_lm else AutoModel

    @classmethod
    def depth(cls, config) -> int:
        return getattr(config, cls.depth_fields[0])

    @classmethod
    def with_depth(cls, config, blocks: int):
        """A copy of `config` with `blocks` blocks in every stack."""
        config = copy.deepcopy(config)
        for name in cls.depth_fields:
            setattr(config, name, blocks)
        return config

    @classmethod
    def stacks_equally_deep(cls, config) -> bool:
        """True when every stack has as many blocks as the first (a plan then extrapolates per block)."""
        return len({getattr(config, name) for name in cls.depth_fields}) == 1

    @classmethod
    def max_positions(cls, config) -> int | None:
        """Longest text input of a model with learned absolute positions; None for relative or rotary ones."""
        return None

    @classmethod
    def default_image_size(cls, config) -> int | None:
        """Pixels per side of a planned image when none is given (image families; None for text)."""
        return None

    @classmethod
    def image_tokens(cls, config, image_size: int) -> int:
        """Tokens the blocks see for an image_size × image_size input (image families)."""
        raise UnsupportedModel(f"{cls.family} backbones read text, not images")

    @classmethod
    def planning_batch(cls, config, batch_size: int, max_length: int, image_size: int | None = None,
                       target_length: int = 1, dtype: torch.dtype = torch.float32, device="meta"
                       ) -> dict[str, torch.Tensor]:
        """The model inputs of a planned step, without labels: token ids B×max_length (zeros) and an
        attention mask of ones (padded to exactly the planned length, every token real); for image families
        pixel_values B×3×S×S (zeros), S = image_size or the family's default, where max_length does not apply.
        target_length and dtype are for the families that read them (decoder positions; pixels)."""
        if cls.modality == "image":
            size = image_size or cls.default_image_size(config)
            return {"pixel_values": torch.zeros(batch_size, 3, size, size, dtype=dtype, device=device)}
        ids = torch.zeros(batch_size, max_length, dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

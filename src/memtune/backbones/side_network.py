"""The side-network hooks of the backbone protocol (LST, QST: docs/methods/lst.md §2, docs/methods/qst.md §2).

A side network is a narrow stack of blocks of the backbone's own class, built from a copy of the (stack)
config at side width d' and run next to the frozen backbone, reading its block outputs. Shapes: B batch,
T tokens, d backbone width, d' side width, s the side state B×T×d'. The methods ask the backbone for
every family fact they need:

    cfg = backbone.side_config(backbone.stack_config(), r, keep=..., dropout=..., attention="sdpa")
    blocks = [backbone.make_side_block(cfg, j) for j in range(len(keep))]
    norm = backbone.side_norm(cfg.hidden_size, cfg)           # the side final norm (Identity for post-LN)
    rotary = backbone.make_side_rotary(cfg)                   # None without rotary positions
    sctx = backbone.side_context(s, ctx, cfg, rotary)         # masks (and rotary tables) at side width
    s = backbone.run_side_block(blocks[j], s, sctx)           # B×T×d' → B×T×d'

LST's pruned-weight initialisation reads `pruning_embedding`, `final_norm` and `pruning_plan(block)`, a chain
of `PruneVector` / `PruneGroup` steps per block (the selection itself is in methods/lst/prune.py); a fused
projection (one weight for q, k, v or for gate, up) is declared as a `Fused` input of its group.
A family that supports side networks mixes `SideNetworkHooks` into its backbone class, declares the
capability "side_network" and implements the hooks that raise NotImplementedError here.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from .base import UnsupportedModel


def build_block(cls: type[nn.Module], config, index: int, **extra) -> nn.Module:
    """Instantiate block class `cls` on `config`; `layer_idx` = index and the `extra` keywords are passed
    where the class takes them."""
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in extra.items() if k in params}
    if "layer_idx" in params:
        kwargs["layer_idx"] = index
    return cls(config, **kwargs)


def nearest_width(x: int, r: int) -> int:
    """x/r rounded to the nearest whole number, at least 1."""
    return max(1, round(x / r))


def head_multiple_widths(d: int, d_ff: int, r: int, side_heads: int, exact: bool) -> tuple[int, int]:
    """(d', d_ff') for blocks whose head width is d / H (BERT-like): d' = H'·round(d/(r·H')), d_ff' =
    round(d_ff/r), so H' divides d'; exact: d/r and ⌊d_ff/r⌋."""
    if exact:
        return d // r, d_ff // r
    return side_heads * nearest_width(d, r * side_heads), nearest_width(d_ff, r)


# -- pruning plans (LST's pruned-weight initialisation, docs/methods/lst.md §8) ------------------------------
@dataclass(frozen=True)
class PruneVector:
    """1-D parameters (paths relative to the block) sliced by the current residual index set P."""
    params: tuple[str, ...]


@dataclass(frozen=True)
class Fused:
    """One input projection whose output rows hold several logical projections, its "parts" (q | k | v,
    gate | up), pruned part by part with the same kept rows.

    `shares`: the parts' relative row counts, in storage order (q, k, v with grouped KV heads: (H, KV, KV));
    `groups`: how often that pattern repeats along the rows (GPT-NeoX stores [head, (q, k, v), d_kv]:
    groups = H). Shares and groups hold at any width, so the same description fits the side copy."""
    path: str
    shares: tuple[int, ...]
    groups: int = 1

    def part_rows(self, rows: int, device=None) -> list[torch.Tensor]:
        """Each part's rows in a projection of `rows` output rows, in the part's own order (group-major:
        for per-head groups, head h's rows of a part come before head h+1's)."""
        unit, rest = divmod(rows, self.groups * sum(self.shares))
        if rest:
            raise ValueError(f"{self.path}: {rows} rows do not split into {self.groups} groups of shares {self.shares}")
        group = torch.arange(self.groups, device=device)[:, None] * (rows // self.groups)    # groups×1
        out, start = [], 0
        for share in self.shares:
            out.append((group + start * unit + torch.arange(share * unit, device=device)).flatten())
            start += share
        return out


@dataclass(frozen=True)
class PruneGroup:
    """Input projections sharing rows, and the output projection whose kept rows become the new P.
    An input is a module path or a `Fused` projection (each of its parts counts as one input; q, k, v in
    that order where `heads` is given). `heads` = (H, KV, d_kv) asks for the head-structured (grouped-KV)
    selection. Projections are nn.Linear (weight out×in) or transformers' Conv1D (weight in×out).
    `head_norms`: norms over each head's d_kv dims (Qwen3 / Gemma 3 q_norm, k_norm), sliced by the within-head
    dims J that the head-structured selection keeps."""
    inputs: tuple[str | Fused, ...]
    output: str
    heads: tuple[int, int, int] | None = None
    head_norms: tuple[str, ...] = ()


@torch.no_grad()
def causal_side_context(s: torch.Tensor, ctx: dict, cfg, rotary=None, cache=None) -> dict:
    """The side blocks' context of a causal decoder: the causal mask at the side config (B×T padding from
    ctx["token_mask"], a KV cache when decoding), the backbone's positions, and the rotary table of the side
    head width where the family has one (`rotary`: the module `make_side_rotary` built)."""
    pos = ctx["position_ids"]
    sctx = {"mask": create_causal_mask(config=cfg, inputs_embeds=s, attention_mask=ctx["token_mask"],
                                       past_key_values=cache, position_ids=pos), "pos": pos, "cache": cache}
    if rotary is not None:
        sctx["rope"] = rotary(s, pos)
    return sctx


@torch.no_grad()
def side_decoder_masks(s: torch.Tensor, memory: torch.Tensor, memory_mask, cfg, cache=None) -> dict:
    """An encoder-decoder's side decoder context: causal self-attention at the side config (with its own
    EncoderDecoderCache when decoding) and cross-attention to memory, the side encoder output B×Ts×d'."""
    self_cache = None if cache is None else cache.self_attention_cache
    return {"mask": create_causal_mask(config=cfg, inputs_embeds=s, attention_mask=None, past_key_values=self_cache),
            "cross_mask": create_bidirectional_mask(config=cfg, inputs_embeds=s, attention_mask=memory_mask,
                                                    encoder_hidden_states=memory),
            "memory": memory, "cache": cache}


def has_submodule(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
        return True
    except AttributeError:
        return False


def norm_step(block: nn.Module, path: str) -> PruneVector:
    """The parameters of the norm at `path` (weight, and bias where present) as one pruning step."""
    m = block.get_submodule(path)
    return PruneVector(tuple(f"{path}.{n}" for n, _ in m.named_parameters(recurse=False)))


class SideNetworkHooks:
    """The side-network hooks and their defaults, mixed into a `Backbone` subclass (before `Backbone`)."""

    # The side blocks may take another head count than the backbone's H (`side_heads`).
    supports_side_heads: ClassVar[bool] = False
    # ... also at LST's rounded widths (False: only at QST's exact ones, where nothing is pruned per head).
    side_heads_when_rounded: ClassVar[bool] = True
    # The block's attention class has a fused (SDPA) path: `attention="auto"` picks it, else eager.
    fused_side_attention: ClassVar[bool] = False
    # Config fields of the hidden dropout rates, and of the attention-probability dropout (None: the family
    # has a single rate, among the hidden ones).
    side_dropout_fields: ClassVar[tuple[str, ...]] = ()
    side_attention_dropout_field: ClassVar[str | None] = None
    # Parameters of backbone block 0 that the first side block of a stack copies whole (not pruned).
    side_shared_tables: ClassVar[tuple[str, ...]] = ()
    # Parameters that every side block copies whole from the backbone block it mirrors (Swin's per-block
    # relative-position tables; H is kept, so they are not pruned).
    side_block_tables: ClassVar[tuple[str, ...]] = ()

    def stack_config(self, decoder: bool = False):
        """The Hugging Face config the blocks of the (decoder) stack were built from."""
        return self.config

    def side_widths(self, config, r: int, heads: int | None, exact: bool) -> dict[str, int]:
        """The width fields of a side config (see `side_config`): config field → value."""
        raise NotImplementedError

    def side_config(self, stack_config, r: int, keep: tuple[int, ...] | None = None, dropout: float | None = None,
                    attention: str = "auto", attention_dropout: float | None = None, heads: int | None = None,
                    exact: bool = False):
        """A copy of `stack_config` at side width, for blocks of the backbone's class.

        exact=False (LST): every width x (d, d_ff, d_kv) becomes max(1, round(x/r)), or the nearest choice the
        family's attention class accepts. exact=True (QST): d' = d/r, head width d'/H, FFN ⌊d_ff/r⌋ (the
        caller has checked `side_width_problem`). heads: the side head count H' (None: H).
        keep: the backbone layers the side blocks mirror, which sets the layer count (None: every layer).
        dropout: every hidden dropout rate the block class reads (None: the backbone's). attention: the
        kernel, "eager" or "sdpa" ("auto" keeps the backbone's). attention_dropout: the attention-probability
        dropout (None: the backbone's; families with a single rate use `dropout`)."""
        c = copy.deepcopy(stack_config)
        if attention != "auto":
            c._attn_implementation = attention
        for name, value in self.side_widths(stack_config, r, heads, exact).items():
            setattr(c, name, value)
        if dropout is not None:
            for name in self.side_dropout_fields:
                setattr(c, name, dropout)
        if attention_dropout is not None and self.side_attention_dropout_field is not None:
            setattr(c, self.side_attention_dropout_field, attention_dropout)
        if keep is not None:
            c.num_hidden_layers = len(keep)
            if getattr(c, "layer_types", None) is not None:
                c.layer_types = [c.layer_types[i] for i in keep]   # side block j mirrors layer keep[j]
        return c

    def side_width_problem(self, r: int, heads: int | None = None) -> str | None:
        """Why d' = d/r exactly (`side_config(exact=True)`) does not fit, or None if it does. heads: the
        side head count (None: the backbone's H, kept)."""
        d = self.config.hidden_size
        kept = heads is None
        heads = self.config.num_attention_heads if kept else heads
        if d % r:
            return f"d={d} is not divisible by r={r}"
        if (d // r) % heads:
            whose = "attention heads (kept from the backbone)" if kept else "side heads (side_heads)"
            return f"the side width d/r={d // r} is not divisible by the {heads} {whose}"
        return None

    def make_side_block(self, cfg, index: int, decoder: bool = False) -> nn.Module:
        """Side block `index` (0-based within its side stack) of the (decoder) stack: the backbone's block
        class on the side config `cfg`."""
        blocks, _ = self._stack(decoder)
        return build_block(type(blocks[0]), cfg, index)

    def side_norm(self, d_side: int, cfg) -> nn.Module:
        """The side network's final norm at width d' (B×T×d' → B×T×d')."""
        raise NotImplementedError

    def make_side_rotary(self, cfg) -> nn.Module | None:
        """The rotary-position table of the side blocks (at the side head width); None without rotary."""
        return None

    def side_context(self, s: torch.Tensor, ctx, cfg, rotary: nn.Module | None = None, cache=None) -> dict:
        """What the side blocks read besides their input s (B×T×d'), from the backbone's ctx: masks at the
        side config `cfg`, rotary tables from `rotary`, a KV cache (`cache`) when decoding. Computed without
        autograd (nothing in it is trained)."""
        return {}

    def side_decoder_context(self, s: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor, cfg,
                             cache=None) -> dict:
        """`side_context` of a side decoder stack cross-attending to memory (B×Ts×d'), memory_mask B×Ts."""
        raise UnsupportedModel(f"{self.family} backbones have no decoder stack")

    def run_side_block(self, block: nn.Module, s: torch.Tensor, sctx: dict) -> torch.Tensor:
        """One side block: s (B×T×d') → B×T×d', with the context of `side_context`."""
        return block(s)

    def embed_new_tokens(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        """Embedding (B×L×d) and ctx of new tokens ids (B×L) for cached decoding (QST's generate)."""
        raise UnsupportedModel(f"{self.family} backbones have no cached decoding")

    def init_side_weights(self, module: nn.Module, cfg) -> None:
        """Initialise `module` the way the backbone's Hugging Face class initialises new weights, with the
        side config (e.g. T5's width-dependent normal init at the side widths)."""
        base = next((k for k in type(self.model).__mro__
                     if issubclass(k, PreTrainedModel) and k is not PreTrainedModel
                     and "_init_weights" in vars(k)), PreTrainedModel)
        holder = base.__new__(base)
        nn.Module.__init__(holder)
        holder.config = cfg
        for m in module.modules():
            base._init_weights(holder, m)

    # -- encoder-decoder facts LST's text-to-text form reads ------------------------------------------------
    def raw_embedding(self, ids: torch.Tensor, decoder: bool = False) -> torch.Tensor:
        """Token embeddings B×T×d of the (decoder) stack before any embedding dropout (ids: B×T)."""
        raise UnsupportedModel(f"{self.family} backbones have no separate raw token embedding")

    def tied_lm_logits(self, o: torch.Tensor) -> torch.Tensor:
        """Decoder states o (…×d) → …×V logits through the tied input embedding."""
        raise UnsupportedModel(f"{self.family} backbones have no tied text-to-text LM head")

    # -- LST pruning facts -----------------------------------------------------------------------------------
    @property
    def pruning_embedding(self) -> torch.Tensor:
        """The embedding weight whose importance picks the side's first residual dims: the token table
        (V×d) or a patch projection (d×C×p×p)."""
        raise NotImplementedError

    def pruning_plan(self, block: nn.Module) -> list[PruneVector | PruneGroup]:
        """The pruning chain of one backbone block, in order."""
        raise NotImplementedError

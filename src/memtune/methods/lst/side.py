"""The side network's parts (docs/methods/lst.md §2, §3, §5): narrow blocks of the backbone's own class, ladders, gates.

Widths: d' = d/r, d_ff' = d_ff/r, per-head width d_kv' = d_kv/r; the head count H is kept, so the
side attention inner width is a = H·d_kv/r (= d' unless d ≠ H·d_kv, e.g. T5-3B: a = 512, d' = 128).

Where a family's attention class cannot take those widths, the nearest valid choice is used:
- BERT-like (BERT, RoBERTa, XLM-R, MPNet) derive the head width from hidden_size / H, so the side
  width is d' = H·round(d_kv/r) (= d/r whenever r divides d_kv; at least one unit per head);
- Llama-like decoders need an even head width for rotary positions: d_kv' = 2·round(d_kv/(2r)), ≥ 2.
Everything else is round(x/r), at least 1. `side_heads` (bert, vit) replaces H by H', with per-head width
d'/H'. The side attention kernel is fused (sdpa) by default where the family has it (see config.py).
"""
from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers import PreTrainedModel

from ..common.compact_linear import TapLinear


def scaled(x: int, r: int) -> int:
    return max(1, round(x / r))


def side_config(family: str, config, r: int, dropout: float, keep: tuple[int, ...], is_dinov2: bool = False,
                attention: str = "eager", attention_dropout: float | None = None, heads: int | None = None):
    """A copy of the backbone's (stack) config with the side widths; every dropout probability the
    block class reads is set to `dropout` (docs/methods/lst.md §2: T5 side blocks use dropout 0.1), except the attention-
    probability dropout: `attention_dropout` where given (T5 has a single rate). `attention` is the side
    kernel ("eager" or "sdpa"; "auto" keeps the backbone's). `heads`: the side head count (None: H);
    the per-head width then follows from the side width, d'/heads."""
    c = copy.deepcopy(config)
    if attention != "auto":
        c._attn_implementation = attention
    attn_p = dropout if attention_dropout is None else attention_dropout
    num_blocks = len(keep)
    if family == "t5":
        c.d_model, c.d_ff, c.d_kv = scaled(c.d_model, r), scaled(c.d_ff, r), scaled(c.d_kv, r)
        c.dropout_rate = dropout
        c.num_layers = num_blocks
    elif family == "bert":
        side_heads = heads or c.num_attention_heads
        # Width H'·round(d/(r·H')): with H' = H this is H·round(d_kv/r).
        c.hidden_size = side_heads * max(1, round(c.hidden_size / (r * side_heads)))
        c.num_attention_heads = side_heads
        c.intermediate_size = scaled(c.intermediate_size, r)
        c.hidden_dropout_prob, c.attention_probs_dropout_prob = dropout, attn_p
        c.num_hidden_layers = num_blocks
    elif family == "vit":
        H = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // H
        side_heads = heads or H
        c.hidden_size = scaled(c.hidden_size, r)
        # ViT/DINOv2 attention read an explicit head_dim: d_kv/r at H heads, the same inner width at H'.
        c.head_dim = max(1, round(H * head_dim / (r * side_heads)))
        c.num_attention_heads = side_heads
        if not is_dinov2:
            c.intermediate_size = scaled(c.intermediate_size, r)
        # DINOv2 sizes its MLP as hidden_size·mlp_ratio, which is then d_ff/r by itself.
        c.hidden_dropout_prob, c.attention_probs_dropout_prob = dropout, attn_p
        c.num_hidden_layers = num_blocks
    elif family == "llama":
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        c.hidden_size = scaled(c.hidden_size, r)
        c.intermediate_size = scaled(c.intermediate_size, r)
        c.head_dim = max(2, 2 * round(head_dim / (2 * r)))
        c.attention_dropout = attn_p
        c.num_hidden_layers = num_blocks
        if getattr(c, "layer_types", None) is not None:
            c.layer_types = [c.layer_types[i] for i in keep]   # side block j mirrors layer keep[j]
    else:
        raise ValueError(family)
    return c


def make_block(cls: type[nn.Module], config, index: int, **extra) -> nn.Module:
    """Instantiate a backbone block class at side width; `layer_idx` is passed where the class takes it."""
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in extra.items() if k in params}
    if "layer_idx" in params:
        kwargs["layer_idx"] = index
    return cls(config, **kwargs)


def family_init(model: nn.Module, config, module: nn.Module) -> None:
    """Initialise `module` the way the backbone's family initialises new weights (init="random").

    Uses the family's `XPreTrainedModel._init_weights` with the side config, so e.g. T5 attention
    weights get T5's width-dependent normal init at the side widths.
    """
    base = next((k for k in type(model).__mro__
                 if issubclass(k, PreTrainedModel) and k is not PreTrainedModel
                 and "_init_weights" in vars(k)), PreTrainedModel)
    holder = base.__new__(base)
    nn.Module.__init__(holder)
    holder.config = config
    for m in module.modules():
        base._init_weights(holder, m)


def small_normal_(linear: nn.Linear) -> nn.Linear:
    """Ladders, W0 and W_up (code): N(0, 0.01²) weights, zero biases."""
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.01)
        if linear.bias is not None:
            linear.bias.zero_()
    return linear


class SideStack(nn.Module):
    """One side stack (docs/methods/lst.md §3): W0, ladders W_i (i in K), gates alpha (one per backbone layer), side
    blocks S_i (i in K) and the side final norm.

        s = W0·drop(e) + b0
        for i in K:  mu = sigmoid(alpha_i / T_g);  s = mu·s + (1 − mu)·(W_i·h_i + b_i);  s = S_i(s)
        out = drop(Norm_side(s))

    Gates of dropped layers exist but are unused (docs/methods/lst.md §5: the code allocates N gates per stack, and
    the §9 parameter count includes them).
    """

    def __init__(self, d: int, d_side: int, num_layers: int, keep: tuple[int, ...], blocks: list[nn.Module],
                 norm: nn.Module, dropout: float, gate_temperature: float, tap_storage: str = "full"):
        super().__init__()
        self.keep = tuple(keep)
        self.temperature = gate_temperature
        # Ladders read frozen taps: each keeps its input for the weight gradient as `tap_storage`.
        self.ladders = nn.ModuleDict({"embed": small_normal_(TapLinear(d, d_side, tap_storage=tap_storage))})
        for i in self.keep:
            self.ladders[str(i)] = small_normal_(TapLinear(d, d_side, tap_storage=tap_storage))
        self.blocks = nn.ModuleDict({str(i): b for i, b in zip(self.keep, blocks)})
        self.gates = nn.Parameter(torch.zeros(num_layers))      # alpha_i, N per stack
        self.norm = norm
        self.drop = nn.Dropout(dropout)                          # stateless: each call draws anew

    def block(self, i: int) -> nn.Module:
        return self.blocks[str(i)]

    def mu(self, i: int) -> torch.Tensor:
        """The gate mu_i = sigmoid(alpha_i / T_g) (a 0-d tensor): the weight of the side state."""
        return torch.sigmoid(self.gates[i] / self.temperature)

    def start(self, e: torch.Tensor) -> torch.Tensor:
        """e: B×T×d frozen embedding output → s: B×T×d'."""
        return self.ladders["embed"](self.drop(e))

    def fuse(self, i: int, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Ladder i fused before side block i: s (B×T×d'), h (B×T×d, backbone block i output)."""
        mu = self.mu(i)
        return mu * s + (1 - mu) * self.ladders[str(i)](h)

    def finish(self, s: torch.Tensor) -> torch.Tensor:
        return self.drop(self.norm(s))

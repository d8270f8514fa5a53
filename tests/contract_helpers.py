"""The method contract's matrix and tools (used by tests/test_contract.py).

The matrix is every registered method (`memtune.METHODS`) × every tiny family (`memtune.models.TINY`) × every
objective the family has (decoders: classification and causal LM). A pair is supported when `memtune.wrap`
builds it; a refused pair must raise ConfigError or UnsupportedModel. Nothing here lists methods by name
except `GRAPH_FREE`, which records what each method's page promises about running frozen blocks without an
autograd graph (docs/methods/*.md), read from the model's own attributes.
"""
from __future__ import annotations

import functools
import re
from typing import Callable

import torch
from torch import nn

import memtune
from memtune.backbones import UnsupportedModel, backbone_for
from memtune.methods import METHODS, ConfigError
from memtune.models import TINY, load_model

from .conftest import tiny_batch

CLASSES = 3                   # head size of classification pairs (not 2: a 2-way head hides a label swap)
REFUSALS = (ConfigError, UnsupportedModel)
LM, CLS = "causal-lm", "classification"


# -- the matrix ---------------------------------------------------------------------------------------------
@functools.cache
def objectives(tiny: str) -> tuple[str, ...]:
    """Objectives of a tiny family: causal LM as well as classification where the backbone is a decoder."""
    return (CLS, LM) if backbone_for(load_model(tiny).model).is_causal_lm else (CLS,)


def all_pairs() -> list[tuple[str, str, str]]:
    return [(m, t, o) for m in METHODS for t in TINY for o in objectives(t)]


def wrap_pair(method: str, tiny: str, objective: str, seed: int = 0) -> memtune.MemtuneModel:
    """A fresh tiny base wrapped with the method's defaults; `seed` fixes the new weights (heads, side nets)."""
    torch.manual_seed(seed)
    return memtune.wrap(load_model(tiny), method, num_labels=None if objective == LM else CLASSES)


@functools.cache
def refusal(method: str, tiny: str, objective: str) -> str | None:
    """The message of a refused pair; None where the method builds. Any other exception counts as
    'supported' here, so the contract tests themselves fail on it with its traceback."""
    try:
        wrap_pair(method, tiny, objective)
    except REFUSALS as e:
        return str(e)
    except Exception:           # noqa: BLE001 - a crash is the tests' business, not the matrix's
        return None
    return None


def supported_pairs():
    return [p for p in all_pairs() if refusal(*p) is None]


def refused_pairs():
    return [p for p in all_pairs() if refusal(*p) is not None]


def pair_id(pair) -> str:
    method, tiny, objective = pair
    return f"{method}-{tiny}-{'lm' if objective == LM else 'cls'}"


def family_of(tiny: str) -> str:
    return backbone_for(load_model(tiny).model).family


# -- batches ---------------------------------------------------------------------------------------------------
def contract_batch(model, batch_size: int = 2, length: int = 10) -> dict[str, torch.Tensor]:
    """The seeded tiny batch (conftest.tiny_batch) with the last 3 tokens of the last text row padded, so that
    masks and the pooling of real tokens are part of every check (causal LM: padded labels are -100)."""
    batch = tiny_batch(model, batch_size, length)
    if "attention_mask" in batch:
        batch["attention_mask"][-1, -3:] = 0
        batch["input_ids"][-1, -3:] = 0                                   # the tiny tokenizer's pad id
        if model.objective == LM:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def adamw(model, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train_steps(model, batch, optimizer, steps: int, seed: int = 0) -> list[float]:
    """`steps` seeded AdamW steps on one batch (train mode: dropout masks come from the seed)."""
    model.train()
    losses = []
    for k in range(steps):
        torch.manual_seed(seed + k)
        optimizer.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    optimizer.zero_grad(set_to_none=True)
    return losses


# -- gradients that the arithmetic forces to zero ------------------------------------------------------------------
# An encoder–decoder classifier reads one decoder position (the start token) and self-attention over a single
# key is a softmax over one score, identically 1: the decoder self-attention's query and key projections and
# its relative position bias get exactly zero gradient, in the backbone and in any copy of those blocks (LST's
# side decoder) or any adapter on them (LoRA, IA3), however long training runs.
_SINGLE_KEY_SELF_ATTENTION = re.compile(r"decoder\..*SelfAttention\.(q|k|relative_attention_bias)\b")


def structurally_zero(model, batch, name: str) -> bool:
    one_position = hasattr(model.backbone, "decoder_blocks") and "decoder_input_ids" not in batch
    return one_position and bool(_SINGLE_KEY_SELF_ATTENTION.search(name))


# -- blocks a method promises to run without an autograd graph ---------------------------------------------------
def all_blocks(model) -> list[nn.Module]:
    """Every block of the backbone: the (encoder) stack, then an encoder–decoder's decoder stack."""
    return list(model.backbone.blocks) + list(getattr(model.backbone, "decoder_blocks", []))


def _lst(m):
    keep = m.output_stack.keep                      # backbone blocks after the last kept one are not run
    if hasattr(m.backbone, "decoder_blocks"):       # the encoder runs to the end: the decoder reads it
        return list(m.backbone.blocks) + list(m.backbone.decoder_blocks[:keep[-1] + 1])
    return list(m.backbone.blocks[:keep[-1] + 1])


GRAPH_FREE: dict[str, Callable[[nn.Module], list[nn.Module]]] = {
    # docs/methods/lst.md §1, §3: the whole backbone runs without a graph (the kept blocks and those below).
    "LSTModel": _lst,
    # qst.md §1, §3: every backbone block under no_grad, interleaved with the side network.
    "QSTModel": lambda m: list(m.backbone.blocks),
    # The linear probe: the frozen backbone without a graph (methods/baselines/), T5's decoder included.
    "LinearProbeModel": lambda m: all_blocks(m),
    # dtl.md §1, §3: the embedding and blocks 0..s₀ run under no_grad.
    "DTLModel": lambda m: list(m.backbone.blocks[:m.s0 + 1]),
    # sherl.md §1, §6: the early route (T5: the whole encoder and the early decoder blocks).
    "SHERLModel": lambda m: list(m.early_blocks),
    # meft.md §11.4: no graph inside the blocks: the frozen lower layers and, in the forward, the reversible ones
    # (they are recomputed in backward, which is the point of reversibility).
    "MEFTModel": lambda m: [m.backbone.blocks[i] for i in range(m.first_adapted)]
                           + [m.backbone.blocks[i] for i in m.reversible_indices],
}


def graph_free_blocks(model) -> list[nn.Module] | None:
    """The blocks the method promises to run without a graph: its own `graph_free_blocks` if it declares one,
    else the promise of its method page (GRAPH_FREE, by model class); None where it promises none."""
    declared = getattr(model, "graph_free_blocks", None)
    if declared is not None:
        return list(declared() if callable(declared) else declared)
    for cls in type(model).__mro__:
        if cls.__name__ in GRAPH_FREE:
            return GRAPH_FREE[cls.__name__](model)
    return None


class BlockCensus:
    """What each of `blocks` does during one forward: how many tensors autograd packs for backward while a
    module inside it runs (parameters included: a graph-free block packs nothing at all), which of its modules
    return a tensor with a grad_fn, and how often its modules run (a block that never runs proves nothing).
    Sub-modules are watched too, since some methods call a block's sub-layers instead of the block."""

    def __init__(self, blocks: list[nn.Module]):
        self.blocks = blocks
        self.saved = [0] * len(blocks)
        self.calls = [0] * len(blocks)
        self.graph_outputs: list[list[str]] = [[] for _ in blocks]   # "module (GradFn)" per block
        self._inside: list[int] = []                                 # block index of each running module

    def __enter__(self):
        self._handles = []
        for i, block in enumerate(self.blocks):
            for name, module in block.named_modules():
                label = name or type(block).__name__
                self._handles.append(module.register_forward_pre_hook(self._enter(i)))
                self._handles.append(module.register_forward_hook(self._leave(label)))
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def _pack(self, t):
        if self._inside:
            self.saved[self._inside[-1]] += 1
        return t

    def _enter(self, i):
        def hook(_module, _args):
            self._inside.append(i)
            self.calls[i] += 1
        return hook

    def _leave(self, label):
        def hook(_module, _args, out):
            i = self._inside.pop()
            self.graph_outputs[i] += [f"{label} ({type(t.grad_fn).__name__})" for t in _tensors(out)
                                      if t.grad_fn is not None]
        return hook

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        for h in self._handles:
            h.remove()
        return False


def _tensors(out):
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for o in out:
            yield from _tensors(o)

"""Gradient checkpointing of the backbone blocks that the backward pass goes through.

memtune's backbones call their blocks directly (`run_block`, T5's `run_decoder_block`), so transformers'
`gradient_checkpointing_enable()` does not apply. `BlockCheckpointing` wraps those two calls in
non-reentrant `torch.utils.checkpoint`: a checkpointed block keeps only its input (B×T×d) for backward and
runs again inside backward to rebuild what its own backward needs.

Which blocks: every call made with autograd on (`torch.is_grad_enabled()`), whatever needs the gradient
(the block's input, its own weights, LoRA / IA3 layers injected into it, adapters hooked onto it). Blocks a
method runs under `no_grad` (a side network's frozen trunk, SHERL's early route, DTL's trunk) keep no
activations anyway and are left as they are; `applied` / `skipped` count the two kinds of call.

Dropout replays exactly: the RNG state is stashed per block and restored for the recomputation
(`preserve_rng_state=True`), so loss and gradients equal the un-checkpointed step's. `ctx` is snapshotted
per call, since T5's block 0 writes the shared position bias into it and the recomputation must see the
state the first run saw.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

STACKS = {"run_block": "blocks", "run_decoder_block": "decoder_blocks"}


class BlockCheckpointing:
    """Checkpoint every `run_block` / `run_decoder_block` call made with autograd on (see module doc).

    `recompute_context()` (a context-manager factory) is entered around each recomputation in backward:
    the planner uses it to re-enter its meta-device kernel stand-ins there. The planner also turns
    `preserve_rng_state` off: meta tensors have no generator to stash.
    """

    def __init__(self, backbone, *, preserve_rng_state: bool = True, recompute_context=None):
        self.applied = 0          # checkpointed block calls
        self.skipped = 0          # block calls made without autograd (nothing to keep)
        self.preserve_rng_state = preserve_rng_state
        self.recompute_context = recompute_context or contextlib.nullcontext
        # Weak: the wrapped calls are stored on the backbone itself, which must not keep itself alive.
        self._backbone = weakref.ref(backbone)
        self.wrapped: list[str] = []
        for name in STACKS:
            if hasattr(type(backbone), name):
                self._wrap(backbone, name)

    def _wrap(self, backbone, name: str) -> None:
        from torch.utils.checkpoint import checkpoint

        original = getattr(type(backbone), name)           # the class's function, called with the backbone
        ref, counts = self._backbone, weakref.ref(self)

        def run(i, h, ctx):
            bb = ref()
            state = counts()
            if state is None or not torch.is_grad_enabled():
                if state is not None:
                    state.skipped += 1
                return original(bb, i, h, ctx)
            state.applied += 1
            snapshot = dict(ctx)
            first: dict = {}

            def fn(x):
                c = dict(snapshot)
                if "ctx" in first:                            # the recomputation, inside backward
                    with state.recompute_context():
                        return original(bb, i, x, c)
                out = original(bb, i, x, c)
                first["ctx"] = c
                return out

            out = checkpoint(fn, h, use_reentrant=False, preserve_rng_state=state.preserve_rng_state)
            ctx.update(first["ctx"])
            return out

        setattr(backbone, name, run)
        self.wrapped.append(name)
        backbone._memtune_checkpointing = self            # keeps the counters alive as long as the backbone

    def remove(self) -> None:
        """Back to plain block calls."""
        bb = self._backbone()
        if bb is None:
            return
        for name in self.wrapped:
            bb.__dict__.pop(name, None)
        bb.__dict__.pop("_memtune_checkpointing", None)
        self.wrapped.clear()

    def status(self) -> str:
        if self.applied:
            return "applied"
        return "not needed" if self.skipped else "not supported"

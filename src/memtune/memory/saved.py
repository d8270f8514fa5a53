"""Bytes saved for backward: a deterministic CPU proxy for activation memory.

Every tensor autograd packs for the backward pass goes through `saved_tensors_hooks`; we count each
underlying storage once and skip parameters (autograd keeps those by reference, they cost nothing extra).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class SavedTensorCounter:
    """Counts unique non-parameter storages packed for backward while `active` is true."""

    def __init__(self, model: nn.Module | None = None):
        self.param_storages = set()
        if model is not None:
            self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}   # data_ptr → nbytes
        self.count = 0                         # packed tensors (parameters included)
        self.active = True

    def pack(self, t: torch.Tensor):
        if self.active:
            self.count += 1
            if not isinstance(t, nn.Parameter) and t.device.type != "meta":
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr not in self.param_storages:
                    self.storages[ptr] = max(self.storages.get(ptr, 0), st.nbytes())
        return t

    @staticmethod
    def unpack(t):
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    @contextmanager
    def __call__(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self


def saved_bytes(model: nn.Module, run) -> int:
    """Bytes saved for backward by `run()` (a closure doing one forward that returns the loss)."""
    counter = SavedTensorCounter(model)
    with counter():
        run()
    return counter.bytes


@contextmanager
def count_saved_inside(modules, model: nn.Module | None = None):
    """Count only tensors packed while one of `modules` is running its forward (pre/post hooks toggle it).

    Used to prove that frozen blocks record no autograd graph: the count stays at zero.
    """
    counter = SavedTensorCounter(model)
    counter.active = False
    depth = [0]

    def pre(_m, _a):
        depth[0] += 1
        counter.active = True

    def post(_m, _a, _o):
        depth[0] -= 1
        counter.active = depth[0] > 0

    handles = []
    for m in modules:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with counter():
            yield counter
    finally:
        for h in handles:
            h.remove()

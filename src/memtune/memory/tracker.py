"""Peak live tensor bytes on any device without allocator statistics (CPU, meta), split by category.

A `TorchDispatchMode` sees every tensor an operator returns. Each new storage gets a record
(bytes, category) and a weak reference whose callback subtracts it when the storage dies, so the
running total is exactly the bytes of live tensor storages, whatever the process's RSS does.

Categories move as the step goes on:
    alloc            → temporary
    packed for backward (saved_tensors_hooks)  → activation
    accumulated into a parameter's .grad        → gradient
Storages alive when tracking starts are classified once: parameter, gradient, optimizer state, input.
At every new peak the per-category totals are copied, so the split at the peak is exact.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

CATEGORIES = ("parameter", "gradient", "optimizer", "input", "activation", "temporary")


@dataclass
class _Record:
    nbytes: int
    category: str


@dataclass
class TrackerResult:
    peak_bytes: int
    start_bytes: int
    peak_split: dict[str, int]
    max_activation_bytes: int
    end_bytes: int = 0
    extra: dict = field(default_factory=dict)


class LiveBytesTracker(TorchDispatchMode):
    def __init__(self, model: torch.nn.Module | None = None, optimizer=None, inputs=()):
        super().__init__()
        self._records = WeakIdKeyDictionary()     # storage → _Record
        self._refs = []                            # keep the weakrefs (and their callbacks) alive
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.peak = 0
        self.peak_split = dict(self.totals)
        self.max_activation = 0
        self._grad_hooks = []
        self._model = model
        if model is not None:
            for p in model.parameters():
                self._add(p.untyped_storage(), "parameter")
                if p.grad is not None:
                    self._add(p.grad.untyped_storage(), "gradient")
        if optimizer is not None:
            for state in optimizer.state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor):
                        self._add(t.untyped_storage(), "optimizer")
        for t in tree_flatten(inputs)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), "input")
        self.start = self.current
        self.peak = self.current
        self.peak_split = dict(self.totals)

    # -- bookkeeping ------------------------------------------------------------------------------------
    def _add(self, st: torch.UntypedStorage, category: str) -> None:
        if st in self._records:
            return
        rec = _Record(st.nbytes(), category)
        self._records[st] = rec
        self._refs.append(weakref.ref(st, lambda _r, rec=rec: self._free(rec)))
        self.totals[category] += rec.nbytes
        self.current += rec.nbytes
        if self.current > self.peak:
            self.peak = self.current
            self.peak_split = dict(self.totals)

    def _free(self, rec: _Record) -> None:
        self.totals[rec.category] -= rec.nbytes
        self.current -= rec.nbytes

    def _move(self, t: torch.Tensor, category: str) -> None:
        rec = self._records.get(t.untyped_storage())
        if rec is None or rec.category in ("parameter", "input", category):
            return
        self.totals[rec.category] -= rec.nbytes
        rec.category = category
        self.totals[category] += rec.nbytes
        if category == "activation":
            self.max_activation = max(self.max_activation, self.totals["activation"])

    # -- hooks --------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage(), "temporary")
        return out

    def _pack(self, t):
        self._move(t, "activation")
        return t

    def __enter__(self):
        self._saved = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._saved.__enter__()
        if self._model is not None:
            for p in self._model.parameters():
                if p.requires_grad:
                    self._grad_hooks.append(
                        p.register_post_accumulate_grad_hook(lambda p: self._move(p.grad, "gradient")))
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._saved.__exit__(*exc)
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks.clear()
        return out

    def result(self) -> TrackerResult:
        return TrackerResult(self.peak, self.start, dict(self.peak_split), self.max_activation, self.current)

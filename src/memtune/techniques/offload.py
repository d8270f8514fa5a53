"""Activation offloading: the tensors a forward pass saves for backward wait in (pinned) CPU memory.

    ActivationOffload(model)        # forward runs under torch.autograd.graph.save_on_cpu(pin_memory=True)

Each saved tensor is copied to host memory when autograd packs it and copied back when backward needs it,
so the GPU holds a step's saved activations only while they are in use; the price is two PCIe copies per
saved tensor. On a CPU device the tensors are already in host memory: offloading is refused there
(`memtune.techniques.MemoryTechniques.check_device`).

The hooks are entered around the wrapped model's forward (a forward pre-hook and an always-called forward
hook), so the model needs no changes and the step's backward pass sees the packed tensors. The planner
passes `hooks=ModelledOffload()`: the same packing on the meta device, counting the host bytes.
"""
from __future__ import annotations

import torch


class ActivationOffload:
    """Enter `hooks()` (default: save_on_cpu with pinned memory on CUDA) around every forward of `model`."""

    def __init__(self, model, hooks=None):
        self.hooks = hooks
        self._stack: list = []
        self.forwards = 0
        self._handles = [model.register_forward_pre_hook(self._enter),
                         model.register_forward_hook(self._exit, always_call=True)]

    def _context(self, module):
        if self.hooks is not None:
            return self.hooks()
        on_cuda = any(p.device.type == "cuda" for p in module.parameters())
        return torch.autograd.graph.save_on_cpu(pin_memory=True) if on_cuda else None

    def _enter(self, module, args):
        ctx = self._context(module)
        if ctx is not None:
            ctx.__enter__()
            self.forwards += 1
        self._stack.append(ctx)

    def _exit(self, module, args, output):
        ctx = self._stack.pop() if self._stack else None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


class ModelledOffload:
    """save_on_cpu on the meta device: packing drops the device copy (the storage dies unless something else
    holds it, as on a GPU) and records its bytes as host bytes; unpacking allocates the device copy again.
    `peak_host_bytes`: every byte the last forward packed (all of it sits in pinned host memory when the
    forward ends, before backward starts releasing it). Each forward starts the count anew."""

    def __init__(self):
        self.host_bytes = 0
        self.peak_host_bytes = 0

    def __call__(self):
        self.reset()
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        self.host_bytes += nbytes
        self.peak_host_bytes = max(self.peak_host_bytes, self.host_bytes)
        return t.shape, t.dtype, t.device, t.requires_grad, nbytes

    def _unpack(self, packed) -> torch.Tensor:
        shape, dtype, device, requires_grad, nbytes = packed
        # save_on_cpu copies back to the tensor's device: a new, contiguous tensor
        return torch.empty(shape, dtype=dtype, device=device)

    def reset(self) -> None:
        self.host_bytes = self.peak_host_bytes = 0

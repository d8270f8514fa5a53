"""The planner's training step on the `meta` device: model, batch, optimizer, kernel stand-ins, tracking.

`run_step` is `measure.training_step` on meta tensors under the live-bytes tracker. What a meta step needs
to stand in for a real one on the modelled device (see `meta_ops`) is entered here: answers to `.item()`,
CUDA's fused dropout, fused SDPA, emulated autocast, also inside the Python code the backward pass runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy

import torch

from ..backbones import family_class
from ..methods import config_for
from .compositions import build_model, set_attention
from .flops import StepCost, counting
from .meta_ops import (AutocastEmulation, FusedAttention, FusedDropout, ScalarAnswers, is_meta_scalar_call,
                       scalar_answer)
from .plan_types import PlanSettings
from .tracker import LiveBytesTracker
from .visual_features import is_feature_source, planning_features

SGD_MOMENTUM = 0.9   # "sgd" means SGD with momentum: one state tensor per trainable parameter
# cuBLAS and cuBLASLt workspaces: PyTorch allocates them through its caching allocator on the first matrix
# product and keeps them, so they count in max_memory_allocated (65 MiB measured on an H100, torch 2.11).
CUDA_WORKSPACE_BYTES = 64 * 2 ** 20


class PlanTracker(LiveBytesTracker):
    """The live-bytes tracker, also answering `.item()` on meta tensors (one dispatch mode, not two)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_meta_scalar_call(func, args):
            return scalar_answer(args[0])
        return super().__torch_dispatch__(func, types, args, kwargs)


def objective_of(config, settings: PlanSettings) -> str:
    """settings.objective, where "auto" is causal LM for the families that predict the next token."""
    if settings.objective != "auto":
        return settings.objective
    return "causal-lm" if family_class(config).is_causal_lm else "classification"


def wrap_planned(base, config, settings: PlanSettings, method: str, options: dict):
    """`base` (a transformers model or `LoadedModel`) wrapped by the method as a planned step runs it: a
    classification head of settings.num_labels (none for causal LM), bf16 weights for precision "bf16",
    training mode."""
    import memtune

    num_labels = None if objective_of(config, settings) in ("causal-lm", "seq2seq") else settings.num_labels
    model = memtune.wrap(base, config_for(method, options), num_labels=num_labels)
    if settings.precision == "bf16":
        model.to(torch.bfloat16)
    return model.train()


def build_planned_model(config, settings: PlanSettings, method: str, options: dict, prepare=None,
                        device="meta"):
    """The HF model built from `config` with fresh weights on `device` (meta for a plan: shapes, no storage),
    wrapped by the method's real implementation (`wrap_planned`).

    `prepare(hf_model)`, if given, edits the HF model before wrapping (e.g. adds bias terms).
    Returns (wrapped model, number of pretrained parameters).
    """
    config = copy.deepcopy(config)
    set_attention(config, settings.attn)
    on_meta = torch.device(device).type == "meta"
    with torch.device(device), (ScalarAnswers() if on_meta else contextlib.nullcontext()):
        hf = build_model(config)                        # as `load_model` builds it: no pooler, no mask token;
        if prepare is not None:                         # a composition: vision and text parts composed
            prepare(hf)
        pretrained = sum(p.numel() for p in hf.parameters())
        model = wrap_planned(hf, config, settings, method, options)
    return model, pretrained


def make_batch(model, settings: PlanSettings, batch_size: int) -> dict[str, torch.Tensor]:
    """The planned inputs on meta (the backbone family's `planning_batch`: padded to exactly the planned
    length, every token real) plus labels: the input ids for causal LM, target ids B×target_length for
    seq2seq (the decoder reads them shifted right), class 0 otherwise. An image-text composition over
    pre-extracted features reads them (B×L×f) where its image would be (`visual_features`)."""
    bb = model.backbone
    dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
    batch = bb.planning_batch(bb.config, batch_size, settings.max_length, image_size=settings.image_size,
                              target_length=settings.target_length, dtype=dtype, device="meta")
    vision = getattr(bb, "vision", None)               # an image-text composition's vision part
    if vision is not None and is_feature_source(vision.config):
        batch["pixel_values"] = planning_features(vision.config, batch_size, dtype)   # B×L×f, pre-extracted
    if model.objective == "causal-lm":
        batch["labels"] = batch["input_ids"].clone()
    elif model.objective == "seq2seq":
        batch["labels"] = torch.zeros(batch_size, settings.target_length, dtype=torch.long, device="meta")
    else:
        batch["labels"] = torch.zeros(batch_size, dtype=torch.long, device="meta")
    return batch


def make_optimizer(model, settings: PlanSettings):
    params = model.parameter_groups()
    foreach = settings.device == "cuda"
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=SGD_MOMENTUM, foreach=foreach)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01, foreach=foreach)


def warm_up(model, optimizer, batch, settings: PlanSettings) -> None:
    """One untracked step, as `measure_training_memory` warms up: the optimizer state comes into being and
    whatever a method does on its first training forward (calibration, caches) is done before measuring."""
    with ScalarAnswers():
        _step(model, optimizer, batch, settings)


@contextlib.contextmanager
def planning_context():
    """Quiet method warnings that speak about values (meta tensors have none), and let methods whose
    custom autograd functions are typed by device run on meta (MEFT's reversible span asks autocast about
    its tensors' device type, and autocast knows no 'meta': the CPU-typed function is used there)."""
    import logging
    import sys

    log = logging.getLogger("memtune")
    level = log.level
    log.setLevel(logging.ERROR)
    rev = sys.modules.get("memtune.methods.meft.reversible")
    added = False
    if rev is not None and isinstance(getattr(rev, "_FUNCTIONS", None), dict) and hasattr(rev, "_make_function"):
        if "meta" not in rev._FUNCTIONS:
            rev._FUNCTIONS["meta"] = _with_backward_modes(rev._make_function("cpu"))
            added = True
    try:
        with warnings_off():
            yield
    finally:
        log.setLevel(level)
        if added:
            rev._FUNCTIONS.pop("meta", None)


def _with_backward_modes(function_cls):
    """A custom autograd function whose backward runs under the planner's kernel stand-ins."""

    class PlannedFunction(function_cls):
        @staticmethod
        def backward(ctx, *grads):
            with backward_modes():
                return function_cls.backward(ctx, *grads)

    PlannedFunction.__name__ = PlannedFunction.__qualname__ = "Planned" + function_cls.__name__
    return PlannedFunction


@contextlib.contextmanager
def warnings_off():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _modes(stack: contextlib.ExitStack, settings: PlanSettings, cache_casts: bool) -> None:
    """Enter the meta stand-ins for the modelled device's kernels (see `meta_ops`)."""
    if settings.device == "cuda":
        stack.enter_context(FusedDropout())
    stack.enter_context(FusedAttention(settings.device))
    if settings.precision.endswith("-amp"):
        dtype = torch.float16 if settings.precision == "fp16-amp" else torch.bfloat16
        stack.enter_context(AutocastEmulation(dtype, policy=settings.device, cache=cache_casts))


# Function modes do not follow the autograd engine into backward, so Python code that runs there
# (checkpoint recomputation, custom autograd functions' backward) re-enters them from this variable.
_BACKWARD_SETTINGS: contextvars.ContextVar = contextvars.ContextVar("memtune_plan_backward", default=None)


@contextlib.contextmanager
def backward_modes():
    """The kernel stand-ins for Python code run by backward, one region per call (a GPU runs it under
    autocast too: `checkpoint` and `custom_bwd` re-enter autocast per recomputation, and autocast caches
    the casts of leaves that require grad until that region ends, as here)."""
    settings = _BACKWARD_SETTINGS.get()
    with contextlib.ExitStack() as stack:
        if settings is not None:
            _modes(stack, settings, cache_casts=True)
        yield


def _step(model, optimizer, batch, settings: PlanSettings) -> None:
    """forward, backward, optimizer step, zero_grad(set_to_none=True), as `measure.training_step`."""
    with contextlib.ExitStack() as stack:
        _modes(stack, settings, cache_casts=True)
        loss = model(**batch).loss
    token = _BACKWARD_SETTINGS.set(settings)
    try:
        loss.backward()
    finally:
        _BACKWARD_SETTINGS.reset(token)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_step(model, optimizer, batch, settings: PlanSettings, count_cost: bool = False):
    """One training step on meta under the live-bytes tracker; with `count_cost`, also under the FLOP and
    byte counter of `flops` (the result's extra["cost"]: a `StepCost`), in the same step."""
    tracker = PlanTracker(model, optimizer, inputs=batch)
    with tracker, (counting(optimizer) if count_cost else contextlib.nullcontext()) as counter:
        _step(model, optimizer, batch, settings)
    result = tracker.result()
    if counter is not None:
        result.extra["cost"] = StepCost(tuple(counter.ops), _batch_size_of(batch))
    return result


def count_planned_step(model, optimizer, batch, settings: PlanSettings) -> StepCost:
    """One planned training step (the same `_step` the memory plan tracks) under the cost counter only."""
    with counting(optimizer) as counter:
        _step(model, optimizer, batch, settings)
    return StepCost(tuple(counter.ops), _batch_size_of(batch))


def _batch_size_of(batch: dict) -> int:
    return int(next(iter(batch.values())).shape[0])

"""The planner's training step on the `meta` device: model, batch, optimizer, kernel stand-ins, tracking.

`run_step` is `measure.training_step` on meta tensors under the live-bytes tracker. What a meta step needs
to stand in for a real one on the modelled device (see `meta_ops`) is entered here: answers to `.item()`,
CUDA's fused dropout, fused SDPA, emulated autocast, also inside the Python code the backward pass runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
from typing import TYPE_CHECKING

import torch

from ..methods import config_for
from ..models import drop_unused_parts, model_class_for
from ..techniques.checkpointing import BlockCheckpointing  # noqa: F401 - the planner's and tests' import path
from .meta_ops import (AutocastEmulation, FusedAttention, FusedDropout, ScalarAnswers, is_meta_scalar_call,
                       scalar_answer)
from .tracker import LiveBytesTracker

if TYPE_CHECKING:
    from .plan import PlanSettings

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


def _depth_keys(config) -> tuple[str, ...]:
    return ("num_layers", "num_decoder_layers") if config.model_type == "t5" else ("num_hidden_layers",)


def config_depth(config) -> int:
    return getattr(config, _depth_keys(config)[0])


def with_depth(config, n: int):
    config = copy.deepcopy(config)
    for k in _depth_keys(config):
        setattr(config, k, n)
    return config


def objective_of(config, settings: PlanSettings) -> str:
    if settings.objective != "auto":
        return settings.objective
    return "causal-lm" if config.model_type in ("llama", "mistral", "qwen2") else "classification"


def default_image_size(config) -> int:
    """DINOv2 checkpoints store 518 (their pretraining crop); their processors feed 224."""
    size = int(getattr(config, "image_size", 224))
    return min(size, 224) if config.model_type == "dinov2" else size


def max_positions(config) -> int | None:
    """Longest input of a model with learned absolute positions (None: relative or rotary positions).

    RoBERTa-style models (RoBERTa, XLM-R, MPNet) number positions from pad_token_id + 1.
    """
    if config.model_type not in ("bert", "roberta", "xlm-roberta", "mpnet"):
        return None
    n = int(config.max_position_embeddings)
    if config.model_type != "bert":
        n -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return n


def build_meta_model(config, settings: PlanSettings, method: str, options: dict, prepare=None):
    """The HF model on meta, wrapped by the method's real implementation, in training mode.

    `prepare(hf_model)`, if given, edits the HF model before wrapping (e.g. adds bias terms).
    Returns (wrapped model, number of pretrained parameters).
    """
    import memtune

    config = copy.deepcopy(config)
    config._attn_implementation = settings.attn
    cls = model_class_for(config)
    num_labels = None if objective_of(config, settings) == "causal-lm" else settings.num_labels
    with torch.device("meta"), ScalarAnswers():
        if hasattr(cls, "from_config"):                 # Auto classes
            hf = cls.from_config(config, dtype=torch.float32)
        else:
            hf = cls(config)
        drop_unused_parts(hf)                           # as `load_model` does: no pooler, no mask token
        if prepare is not None:
            prepare(hf)
        pretrained = sum(p.numel() for p in hf.parameters())
        model = memtune.wrap(hf, config_for(method, options), num_labels=num_labels)
    if settings.precision == "bf16":
        model.to(torch.bfloat16)
    model.train()
    return model, pretrained


def make_batch(model, settings: PlanSettings, batch_size: int) -> dict[str, torch.Tensor]:
    """Inputs on meta, padded to exactly the planned length (all tokens real), plus labels."""
    bb = model.backbone
    meta = torch.device("meta")
    if bb.family == "vit":
        size = settings.image_size or default_image_size(bb.config)
        dtype = torch.bfloat16 if settings.precision == "bf16" else torch.float32
        batch = {"pixel_values": torch.empty(batch_size, 3, size, size, device=meta, dtype=dtype)}
    else:
        ids = torch.zeros(batch_size, settings.max_length, dtype=torch.long, device=meta)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if bb.family == "bert" and getattr(bb.config, "type_vocab_size", 0) and not getattr(bb, "is_mpnet", False):
            batch["token_type_ids"] = torch.zeros_like(ids)      # what BERT tokenizers return
        if bb.family == "t5" and settings.target_length > 1:
            batch["decoder_input_ids"] = torch.zeros(batch_size, settings.target_length, dtype=torch.long,
                                                     device=meta)
    if model.objective == "causal-lm":
        batch["labels"] = batch["input_ids"].clone()
    else:
        batch["labels"] = torch.zeros(batch_size, dtype=torch.long, device=meta)
    return batch


def make_optimizer(model, settings: PlanSettings):
    params = [p for p in model.parameters() if p.requires_grad]
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
    from .flops import StepCost, counting

    tracker = PlanTracker(model, optimizer, inputs=batch)
    with tracker, (counting(optimizer) if count_cost else contextlib.nullcontext()) as counter:
        _step(model, optimizer, batch, settings)
    result = tracker.result()
    if counter is not None:
        result.extra["cost"] = StepCost(tuple(counter.ops), int(next(iter(batch.values())).shape[0]))
    return result

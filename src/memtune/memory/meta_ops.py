"""What a training step on the `meta` device needs to stand in for a real one.

Meta tensors have shapes and dtypes but no values, so three things need help:

- `.item()` (`aten._local_scalar_dense`): model code asks e.g. `attention_mask.all()` to skip an
  all-ones mask. Planning inputs are padded to exactly the planned length (every token real), so a
  boolean question gets True, and a number gets 1 (`ScalarAnswers`; every answer is counted).
- autocast: autocast dispatch keys exist only for real backends (CPU, CUDA, ...), so `torch.autocast`
  does nothing to meta tensors. `AutocastEmulation` is a `TorchFunctionMode` that applies the cast
  policy above autograd, where real autocast acts: the casts are recorded by autograd and the
  lower-precision copies are what the matmuls save for backward, as on a GPU. Policies: "cuda"
  (the GPU's lists, for plans) and "cpu" (the CPU's lists, to check plans against CPU measurements).
  fp16 and bf16 have the same sizes, so one emulation serves both.
- fused attention (`--attn sdpa`): on meta, `scaled_dot_product_attention` takes the math path and
  materialises B×H×T×T scores, which a GPU's flash / memory-efficient kernels never do.
  `FusedAttention` models those kernels: the output, a float32 log-sum-exp B×H×T, and saved q, k, v,
  output and log-sum-exp; its backward returns gradients shaped like q, k, v.
- dropout: on CPU and meta `F.dropout` saves a float mask; a GPU's fused kernel saves a bool mask
  (`FusedDropout` makes the meta step use the GPU's kernel when a GPU is modelled).
"""
from __future__ import annotations

import contextvars

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SCALAR = torch.ops.aten._local_scalar_dense.default


def scalar_answer(tensor: torch.Tensor):
    """The value a meta tensor's `.item()` stands for when every token is real (see module doc)."""
    if tensor.dtype == torch.bool:
        return True
    if tensor.is_floating_point():
        return 1.0
    return 1


def is_meta_scalar_call(func, args) -> bool:
    return func is _SCALAR and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta"


class ScalarAnswers(TorchDispatchMode):
    """Answers `.item()` on meta tensors (model construction and steps outside the byte tracker)."""

    def __init__(self):
        super().__init__()
        self.answered = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_meta_scalar_call(func, args):
            self.answered += 1
            return scalar_answer(args[0])
        return func(*args, **(kwargs or {}))


# -- autocast ------------------------------------------------------------------------------------------
# Names of the torch functions (free functions and Tensor methods alike) by policy list.
_LOWER_CUDA = {
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "addr",
    "mv", "chain_matmul", "multi_dot", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
    "conv_transpose3d", "conv_tbc", "prelu", "scaled_dot_product_attention", "einsum",
}
# fp32 ops whose kernels accept dtype=float32 (autocast's "fp32_set_opt_dtype": no input copy).
_FP32_DTYPE_CUDA = {"softmax", "log_softmax", "sum", "cumsum", "cumprod", "prod"}
_FP32_CUDA = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus", "layer_norm", "group_norm", "norm",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss",
    "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss",
    "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss", "multi_margin_loss",
    "binary_cross_entropy_with_logits", "cross_entropy", "dist", "pdist", "cdist", "renorm", "logsumexp",
}
_LOWER_CPU = {
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "conv1d",
    "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "conv_tbc", "prelu",
    "scaled_dot_product_attention", "einsum",
}
_FP32_CPU = {
    "nll_loss", "cross_entropy", "mse_loss", "cosine_embedding_loss", "hinge_embedding_loss", "poisson_nll_loss",
    "smooth_l1_loss", "l1_loss", "huber_loss", "margin_ranking_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "kl_div", "multilabel_margin_loss", "binary_cross_entropy_with_logits", "cdist",
    "prod", "quantile", "nanquantile", "stft", "trace",
}
POLICIES = {
    "cuda": (_LOWER_CUDA, _FP32_CUDA, _FP32_DTYPE_CUDA),
    "cpu": (_LOWER_CPU, _FP32_CPU, set()),
}


class AutocastEmulation(TorchFunctionMode):
    """`torch.autocast(dtype=...)` for meta tensors, one policy's lists (see module doc).

    Like autocast, casts of leaf tensors that require grad (trainable weights) are cached until the
    region ends, so a weight used twice is cast once and its copy lives for the whole forward pass.
    """

    def __init__(self, dtype=torch.bfloat16, policy: str = "cuda", cache: bool = True):
        super().__init__()
        self.dtype = dtype
        self.cache = cache
        self.lower, self.fp32, self.fp32_dtype = POLICIES[policy]
        self._cache: dict[int, torch.Tensor] = {}

    def __exit__(self, *exc):
        self._cache.clear()
        return super().__exit__(*exc)

    def _cast(self, x, to):
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()) or x.dtype in (to, torch.float64):
            return x
        if to != torch.float32 and x.dtype != torch.float32:
            return x
        if self.cache and x.is_leaf and x.requires_grad and to != torch.float32:
            key = id(x)
            hit = self._cache.get(key)
            if hit is None or hit[0] is not x:
                hit = self._cache[key] = (x, x.to(to))
            return hit[1]
        return x.to(to)

    def _cast_all(self, value, to):
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast_all(v, to) for v in value)
        return self._cast(value, to)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in self.lower:
            args = self._cast_all(args, self.dtype)
            kwargs = {k: self._cast_all(v, self.dtype) for k, v in kwargs.items()}
        elif name in self.fp32_dtype:
            first = args[0] if args else None
            if (isinstance(first, torch.Tensor) and first.dtype in (torch.float16, torch.bfloat16)
                    and kwargs.get("dtype") is None):
                kwargs = {**kwargs, "dtype": torch.float32}
        elif name in self.fp32:
            args = self._cast_all(args, torch.float32)
            kwargs = {k: self._cast_all(v, torch.float32) for k, v in kwargs.items()}
        return func(*args, **kwargs)


# -- fused attention ------------------------------------------------------------------------------------
class _FusedAttentionFn(torch.autograd.Function):
    """Flash / memory-efficient attention as memory: saves q, k, v, out and a float32 log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])                     # B×H×Tq×Dv
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)             # B×H×Tq
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        # dq, dk, dv (the kernels' float32 row term, B×H×Tq, is too small to model).
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


# Receives (q, k, v, is_causal) of every fused attention call while a step's cost is counted.
ATTENTION_COST_SINK: contextvars.ContextVar = contextvars.ContextVar("memtune_attention_cost", default=None)


class FusedAttention(TorchFunctionMode):
    """Replace `scaled_dot_product_attention` with the memory model of a fused kernel.

    Entered for every plan, whatever `--attn` says: a model with eager attention makes no SDPA call, but a
    side network may (LST's side blocks use SDPA by default). On the GPU (`device="cuda"`) the flash /
    memory-efficient kernels take dropout too; PyTorch's CPU flash kernel runs only without dropout, so on
    `device="cpu"` a call with dropout_p > 0 keeps the math path (B×H×T×T maps saved), as a CPU run does.
    """

    def __init__(self, device: str = "cuda"):
        super().__init__()
        self.device = device
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            dropout_p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            if self.device == "cpu" and dropout_p > 0:
                return func(*args, **kwargs)
            self.calls += 1
            q, k, v = args[:3]          # B×H×T×D; grouped-query k, v keep their fewer heads (enable_gqa)
            sink = ATTENTION_COST_SINK.get()
            if sink is not None:        # the kernel's FLOPs, for `flops.CostCounter` (no operators run here)
                sink(q, k, v, bool(kwargs.get("is_causal", args[5] if len(args) > 5 else False)))
            return _FusedAttentionFn.apply(q, k, v)
        return func(*args, **kwargs)


# -- dropout as a GPU runs it --------------------------------------------------------------------------
class FusedDropout(TorchFunctionMode):
    """Dropout with the kernel a GPU uses: `native_dropout`, which saves a 1-byte boolean mask.

    On CPU and meta, `F.dropout` takes the composite path (a float mask the size of the input, 4 bytes
    per element for fp32, saved for backward); CUDA's fused kernel keeps a bool mask instead. At T5-base,
    batch 100, length 128, that difference alone is about 2.6 GiB of the full fine-tuning peak.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "dropout":
            names = ("input", "p", "training", "inplace")
            values = dict(zip(names, args))
            values.update(kwargs)
            x, p = values.get("input"), values.get("p", 0.5)
            training = values.get("training", values.get("train", True))
            if isinstance(x, torch.Tensor) and training and 0 < p < 1 and x.numel() > 0:
                return torch.native_dropout(x, p, True)[0]
        return func(*args, **kwargs)

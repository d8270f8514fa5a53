"""The work of a planned training step: FLOPs and bytes moved per operator, counted on the `meta` device.

    cost = plan_step.count_planned_step(model, optimizer, batch, settings)   # one meta step, counted
    cost.totals()                      # {"forward": {"matmul": FLOPs, ...}, "backward": ..., "optimizer": ...}
    seconds = cost.seconds(profile)    # `devices.DeviceProfile`: per-operator roofline, summed

Every aten operator the step runs (forward, backward, `optimizer.step()`) is one record:
    phase      forward | backward | optimizer (backward includes checkpoint recomputation, MEFT's inverse
               passes and whatever a custom backward runs; a side method's no-grad trunk appears only in forward)
    kind       matmul (FLOPs from `torch.utils.flop_counter`'s formulas), attention (a fused kernel, see
               below), transcendental (exp, erf, softmax, norms: compute per element), random (dropout masks),
               memory (everything else: bytes read + written)
    dtype      of the first floating input ("fp32", "bf16", "fp16", ...), which picks the matmul rate
    flops, bytes (read + written), elements (of the outputs), fresh (bytes of outputs in new storage, by
               storage: a CPU allocator maps large blocks fresh from the OS, and first touch costs page faults)
Views and allocations move no data and are not counted. Fused attention (`--attn sdpa` on a modelled GPU)
is a stand-in without operators inside (`meta_ops.FusedAttention`), so its FLOPs are reported to this
counter by that stand-in: 4·B·H·Tq·Tk·D forward (QKᵀ and PV), 2.5× that backward (flash attention's
backward recomputes the scores and runs four products), halved when causal. Its `elements` are the score
count B·H·Tq·Tk (halved when causal) forward and `BACKWARD_SCORE_PASSES` times that backward: the per-score
work (scale, max, exp, sum; backward: exp again and dS = P∘(dP − δ)), which does not shrink with the head width
D and which a CPU profile prices (`DeviceProfile.attention_scores`).

Costs at two batch sizes with the same operator sequence interpolate per operator (`interpolate`): every
operator's FLOPs and bytes are affine in the batch size (activation terms grow, weight terms stay), so the
step at any batch is known from two counted steps. Depth extrapolation is linear in the seconds.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from .meta_ops import ATTENTION_COST_SINK, is_meta_scalar_call, scalar_answer

PHASES = ("forward", "backward", "optimizer")
KINDS = ("matmul", "attention", "transcendental", "random", "memory")
BACKWARD_SCORE_PASSES = 3       # fused attention's backward per-score work, in forward passes (CPU: 3.1 measured)

_aten = torch.ops.aten
# Elementwise and row-wise operators whose CPU (and, less so, GPU) cost is compute per element, not bytes
# (division included: a CPU divides at a fraction of its add rate).
_TRANSCENDENTAL = {
    "exp", "exp_", "log", "log_", "tanh", "tanh_backward", "sigmoid", "sigmoid_backward", "erf", "erfinv",
    "gelu", "gelu_backward", "silu", "silu_backward", "softplus", "pow", "pow_", "rsqrt", "sqrt", "sqrt_",
    "reciprocal", "_softmax", "_softmax_backward_data", "_log_softmax", "_log_softmax_backward_data",
    "native_layer_norm", "native_layer_norm_backward", "sin", "cos", "div", "div_", "_foreach_sqrt",
    "_foreach_sqrt_", "_foreach_div", "_foreach_div_", "_foreach_addcdiv_", "logsumexp",
}
_RANDOM = {"bernoulli", "bernoulli_", "native_dropout", "rand", "rand_like", "uniform_", "normal_", "randn",
           "randn_like"}
# Operators that allocate or reinterpret storage without moving data.
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
         "_local_scalar_dense", "_unsafe_view", "resolve_conj", "resolve_neg", "set_"}
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
           torch.int8: "int8", torch.uint8: "int8", torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8"}


def _nbytes(t: torch.Tensor) -> int:
    """Bytes an operator touches in `t`: its elements, at most its storage (an expanded tensor is read once)."""
    n = t.numel() * t.element_size()
    try:
        return min(n, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return n


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _dtype_of(tensors) -> str:
    for t in tensors:
        if t.is_floating_point():
            return _DTYPES.get(t.dtype, str(t.dtype).replace("torch.", ""))
    return _DTYPES.get(tensors[0].dtype, "int") if tensors else "fp32"


@dataclass(frozen=True)
class StepCost:
    """One training step's operators: `ops` is a tuple of (phase, kind, dtype, flops, bytes, elements, fresh),
    fresh a tuple of the sizes of the new storages the operator returned."""

    ops: tuple
    batch_size: int

    def __deepcopy__(self, memo):        # immutable: plans copied for extrapolation share it
        return self

    def totals(self) -> dict:
        """phase → {"<kind>_flops", "bytes", "ops"}; FLOPs counted for matmul and attention only."""
        out = {p: {"matmul_flops": 0, "attention_flops": 0, "bytes": 0, "ops": 0} for p in PHASES}
        for phase, kind, _dtype, flops, nbytes, _n, _fresh in self.ops:
            d = out[phase]
            if kind in ("matmul", "attention"):
                d[f"{kind}_flops"] += flops
            d["bytes"] += nbytes
            d["ops"] += 1
        return out

    def flops(self, phase: str | None = None) -> int:
        return sum(op[3] for op in self.ops if (phase is None or op[0] == phase)
                   and op[1] in ("matmul", "attention"))

    def seconds(self, profile, by_phase: bool = False):
        """Predicted step time on `profile` (a `devices.DeviceProfile`): the sum of per-operator times."""
        per = dict.fromkeys(PHASES, 0.0)
        for phase, kind, dtype, flops, nbytes, n, fresh in self.ops:
            per[phase] += profile.op_seconds(kind, dtype, flops, nbytes, n, fresh)
        total = sum(per.values())
        return (total, per) if by_phase else total


def interpolate(a: StepCost, b: StepCost, batch_size: int) -> StepCost | None:
    """The step at `batch_size` from steps at a.batch_size < b.batch_size, operator by operator.

    None when the two steps ran different operator sequences (a method whose control flow depends on the
    batch size): then the step has to be counted at that batch.
    """
    if len(a.ops) != len(b.ops) or a.batch_size == b.batch_size:
        return None
    span = b.batch_size - a.batch_size
    w = (batch_size - a.batch_size) / span
    ops = []
    for x, y in zip(a.ops, b.ops):
        if x[:3] != y[:3]:
            return None
        if len(x[6]) != len(y[6]):
            return None
        ops.append(x[:3] + tuple(max(0, int(round(u + (v - u) * w))) for u, v in zip(x[3:6], y[3:6]))
                   + (tuple(max(0, int(round(u + (v - u) * w))) for u, v in zip(x[6], y[6])),))
    return StepCost(tuple(ops), batch_size)


class CostCounter(TorchDispatchMode):
    """Records every operator's FLOPs and bytes, by phase; answers `.item()` on meta tensors."""

    def __init__(self, optimizer=None):
        super().__init__()
        self.ops: list[tuple] = []
        self.in_optimizer = False
        self._handles = []
        if optimizer is not None:
            self._handles = [optimizer.register_step_pre_hook(lambda *a: self._set_optimizer(True)),
                             optimizer.register_step_post_hook(lambda *a: self._set_optimizer(False))]

    def _set_optimizer(self, value: bool) -> None:
        self.in_optimizer = value

    def phase(self) -> str:
        if self.in_optimizer:
            return "optimizer"
        return "backward" if torch._C._current_autograd_node() is not None else "forward"

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def add_attention(self, q, k, v, causal: bool) -> None:
        """A fused attention call (q: B×H×Tq×D, k: B×Hk×Tk×D, v: B×Hk×Tk×Dv): forward and, when gradients
        flow, the backward the kernel will run (its stand-in's backward has no operators to count)."""
        b, h, tq, d = q.shape
        tk, dv = k.shape[-2], v.shape[-1]
        scores = b * h * tq * tk // (2 if causal else 1)
        fwd = 2 * scores * (d + dv)
        moved = sum(_nbytes(t) for t in (q, k, v)) + b * h * tq * dv * q.element_size()
        dtype = _dtype_of([q])
        phase = self.phase()
        self.ops.append((phase, "attention", dtype, fwd, moved, scores, ()))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            self.ops.append(("backward", "attention", dtype, int(2.5 * fwd), 2 * moved,
                             BACKWARD_SCORE_PASSES * scores, ()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_meta_scalar_call(func, args):
            return scalar_answer(args[0])
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _FREE:
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        nbytes = sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)
        elements = sum(t.numel() for t in outputs)
        flops = 0
        formula = flop_registry.get(func.overloadpacket)
        if formula is not None:
            kind = "matmul"
            flops = int(formula(*args, **kwargs, out_val=out))
        elif name in _RANDOM:
            kind = "random"
        elif name in _TRANSCENDENTAL:
            kind = "transcendental"
        else:
            kind = "memory"
        known = {_storage_key(t) for t in inputs}
        fresh = {}
        for t in outputs:
            key = _storage_key(t)
            if key not in known:
                fresh[key] = t.untyped_storage().nbytes()
        self.ops.append((self.phase(), kind, _dtype_of(inputs or outputs), flops, nbytes, elements,
                         tuple(fresh.values())))
        return out


@contextlib.contextmanager
def counting(optimizer=None):
    """A CostCounter, also receiving fused-attention calls, for the duration of the block."""
    counter = CostCounter(optimizer)
    token = ATTENTION_COST_SINK.set(counter.add_attention)
    try:
        with counter:
            yield counter
    finally:
        ATTENTION_COST_SINK.reset(token)
        counter.remove_hooks()

"""Per-GPU memory and communication of a planned step on N GPUs, as each data-parallel scheme shards it.

    shard = shard_plan(method_plan, num_gpus=8, scheme="fsdp", profile=get_profile("h100"))
    shard.per_gpu["parameter"], shard.comm_bytes, shard.peak_bytes

The unsharded plan is one GPU's step at the per-GPU batch (`--batch-size` is per GPU, as in every
data-parallel launcher). Its peak split (`MethodPlan.peak_split`: parameter, gradient, optimizer, input,
activation, temporary bytes live at the peak) is re-divided by what each scheme shards:

    scheme        parameters            gradients (trainable)   optimizer state   extra per GPU
    ddp           replicated            replicated              replicated        gradient buckets (= grads)
    zero1         replicated            replicated              / N               -
    zero2         replicated            / N                     / N               -
    zero3, fsdp   / N (frozen too)      / N                     / N               2 blocks gathered
    fsdp-hybrid   / S (S GPUs per node) / S                     / S               2 blocks gathered

Frozen weights have no gradients or optimizer state in any scheme; FSDP and ZeRO-3 shard them with the rest.
A sharded category is divided as a flat buffer, so the per-GPU figure is ceil(bytes / N): N of them add
back to the unsharded bytes plus less than N bytes of padding. FSDP/ZeRO-3 all-gather one block's full
weights before running it and prefetch the next, so two blocks' weights are live beyond the shard.
Activations, inputs and temporaries are per GPU at the per-GPU batch, as planned, except where the unsharded
peak falls in the optimizer step (no activations alive): its parameter-sized temporaries shrink with the
optimizer state, and the backward's peak (sharded state + the most bytes saved for backward) may take over.

Communication per GPU per step (ring collectives: an all-reduce sends 2(N−1)/N of the buffer, a reduce-
scatter or all-gather (N−1)/N): DDP all-reduces the gradients; ZeRO-1/2 reduce-scatter the gradients and
all-gather the updated trainable weights; ZeRO-3/FSDP all-gather every weight for forward and again for
backward (an upper bound for side methods, whose frozen trunk needs none in backward) and reduce-scatter the
gradients; hybrid does that inside a node and all-reduces gradient shards across nodes. Seconds use the
profile's link bandwidth, and the step is max(compute, communication): the frameworks overlap the two.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..methods import ConfigError

SCHEMES = ("ddp", "fsdp", "fsdp-hybrid", "zero1", "zero2", "zero3")
SHARDED = {  # scheme → categories divided across the shard group
    "ddp": (), "zero1": ("optimizer",), "zero2": ("optimizer", "gradient"),
    "zero3": ("optimizer", "gradient", "parameter"), "fsdp": ("optimizer", "gradient", "parameter"),
    "fsdp-hybrid": ("optimizer", "gradient", "parameter"),
}
GATHERED_BLOCKS = 2          # the block running and the one prefetched


def _ceil_div(a: int, n: int) -> int:
    return -(-int(a) // n)


@dataclass
class ShardedPlan:
    scheme: str
    num_gpus: int
    shard_group: int                      # GPUs one copy of the model state is split over
    per_gpu: dict                         # category → bytes on one GPU at the step's peak
    static_per_gpu: dict                  # parameter / gradient / optimizer bytes (numel × size) per GPU
    gathered_bytes: int                   # full weights of the gathered blocks (FSDP / ZeRO-3)
    bucket_bytes: int                     # DDP's gradient buckets
    peak_bytes: int
    comm_bytes: int                       # sent per GPU per step
    comm_seconds: float | None
    step_time_s: float | None             # max(compute, communication)
    peak_phase: str = ""                  # where the per-GPU peak falls
    max_batch_size: int | None = None     # per GPU, under the budget
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _group(scheme: str, num_gpus: int, gpus_per_node: int) -> int:
    if scheme == "fsdp-hybrid":
        if num_gpus % gpus_per_node:
            raise ConfigError(f"--sharding fsdp-hybrid needs --num-gpus to be a multiple of the GPUs per node "
                              f"({gpus_per_node}), got {num_gpus}")
        return gpus_per_node
    return num_gpus if SHARDED[scheme] else 1


def shard_plan(m, num_gpus: int, scheme: str, profile=None, num_blocks: int | None = None,
               gpus_per_node: int | None = None, budget_bytes: int | None = None,
               batch_size: int = 1) -> ShardedPlan:
    """Per-GPU bytes and communication of the planned row `m` (a `MethodPlan` planned at the per-GPU
    `batch_size`) on `num_gpus` GPUs; with a budget, the largest per-GPU batch that fits."""
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown sharding {scheme!r}; known: {', '.join(SCHEMES)}")
    if num_gpus < 1:
        raise ConfigError(f"--num-gpus must be >= 1, got {num_gpus}")
    gpus_per_node = gpus_per_node or min(num_gpus, 8)
    group = _group(scheme, num_gpus, gpus_per_node)
    sharded = SHARDED[scheme] if group > 1 else ()
    static = {"parameter": m.parameter_bytes, "gradient": m.gradient_bytes, "optimizer": m.optimizer_bytes}
    static_per_gpu = {k: _ceil_div(v, group) if k in sharded else v for k, v in static.items()}
    # A peak with no activations alive is in the optimizer step: its temporaries are parameter-sized
    # (foreach AdamW) and shrink with the state each GPU updates.
    in_optimizer = m.peak_split.get("activation", 0) == 0 and m.gradient_bytes > 0
    divided = set(sharded) | ({"temporary"} if in_optimizer and "optimizer" in sharded else set())
    per_gpu = {k: (_ceil_div(v, group) if k in divided else v) for k, v in m.peak_split.items()}
    gathered = 0
    if "parameter" in sharded and num_blocks:
        # Full weights of GATHERED_BLOCKS blocks (the embeddings and head are counted as one block's worth).
        gathered = min(m.parameter_bytes, GATHERED_BLOCKS * m.parameter_bytes // max(1, num_blocks))
    buckets = m.gradient_bytes if scheme == "ddp" and num_gpus > 1 else 0
    peak = sum(per_gpu.values()) + gathered + buckets + m.workspace_bytes
    phase = "optimizer step" if in_optimizer else "forward/backward"
    if in_optimizer and sharded:
        # Sharding shrinks the optimizer step's peak; the backward's may now be the larger: the sharded state
        # plus the most bytes saved for backward at once.
        backward = (sum(static_per_gpu.values()) + m.saved_activation_bytes + m.input_bytes + gathered + buckets
                    + m.workspace_bytes)
        if backward > peak:
            peak, phase = backward, "forward/backward (estimated: sharded state + saved activations)"
    comm = _comm_bytes(scheme, num_gpus, group, m)
    comm_s = step_s = None
    notes = []
    if profile is not None and profile.link_bytes_per_s and num_gpus > 1:
        intra, inter = comm
        comm_s = intra / profile.link_bytes_per_s + inter / (profile.node_link_bytes_per_s or profile.link_bytes_per_s)
        if m.step_time_s is not None:
            step_s = max(m.step_time_s, comm_s)
    elif num_gpus == 1 and m.step_time_s is not None:
        comm_s, step_s = 0.0, m.step_time_s
    if scheme in ("fsdp", "zero3", "fsdp-hybrid") and not num_blocks:
        notes.append("block count unknown: gathered weights not included")
    out = ShardedPlan(scheme, num_gpus, group, per_gpu, static_per_gpu, gathered, buckets, peak, sum(comm), comm_s,
                      step_s, peak_phase=phase, notes=notes)
    if budget_bytes is not None and m.bytes_per_sample:
        # peak(B) = peak(B0) + (B − B0)·slope per GPU; the sharded part does not depend on B.
        out.max_batch_size = max(0, batch_size + int((budget_bytes - peak) // m.bytes_per_sample))
    return out


def _comm_bytes(scheme: str, n: int, group: int, m) -> tuple[int, int]:
    """(inside-node bytes, between-node bytes) sent per GPU per step."""
    if n == 1:
        return 0, 0
    grads, trainable, weights = m.gradient_bytes, m.gradient_bytes, m.parameter_bytes

    def ring(nbytes, k, factor=1.0):
        return int(factor * nbytes * (k - 1) / k) if k > 1 else 0

    if scheme == "ddp":
        return ring(grads, n, 2.0), 0
    if scheme in ("zero1", "zero2"):
        return ring(grads, n) + ring(trainable, n), 0
    if scheme in ("zero3", "fsdp"):
        return 2 * ring(weights, n) + ring(grads, n), 0
    nodes = n // group                                  # fsdp-hybrid
    return 2 * ring(weights, group) + ring(grads, group), ring(grads // group, nodes, 2.0)

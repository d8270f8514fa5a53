"""Device profiles: how fast a device runs each kind of operator, to turn a step's counted work into seconds.

    profile = get_profile("h100")          # shipped GPU profiles: h100, h200, a100-80gb, l4, rtx-4090, rtx-a6000
    profile = get_profile("cpu")           # this machine, calibrated by a short measured run, cached
    profile.op_seconds("matmul", "bf16", flops, nbytes, elements)

Per operator (a roofline): time = max(FLOPs / matmul rate(dtype), bytes / bandwidth) for products, elements /
rate or bytes / bandwidth (the larger) for transcendental and random operators, bytes / bandwidth for the rest;
then the per-operator launch cost: added on a CPU (the host runs the kernel), overlapped on a GPU (the host
queues kernels while earlier ones run, so an operator costs at least its launch).

GPU figures are the vendors' dense (no sparsity) peak rates × an achievable share: 0.7 of tensor-core peak for
large products, 0.85 of SIMT fp32 peak, 0.85 of memory bandwidth. fp32 products use fp32 (not TF32): PyTorch's
default `torch.backends.cuda.matmul.allow_tf32 = False`. These are not measured on each GPU; a lent GPU can check
them (benchmarks/plan_vs_cuda.py records measured step times when it runs on one).

The CPU profile is measured here (`calibrate_cpu`, a few seconds): matrix products at three sizes per dtype,
`add` bandwidth at four working-set sizes (a CPU's caches make small tensors faster than DRAM), exp/erf/softmax/
layer-norm and Bernoulli rates per element, fused attention's per-score rate per dtype (PyTorch's CPU flash
kernel: scale, max, exp and sum for every score, at any head width), and the launch cost as the part of a tiny
model's measured training step that its counted work does not explain. Cached in ~/.cache/memtune (keyed by
processor, torch threads and torch version); `get_profile("cpu", refresh=True)` measures again.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..methods import ConfigError
from .flops import BACKWARD_SCORE_PASSES, counting
from .plan_types import PlanSettings
from .real_step import build_real_step, step_clock, time_step

CALIBRATION_VERSION = 4
TENSOR_CORE_SHARE, SIMT_SHARE, BANDWIDTH_SHARE = 0.7, 0.85, 0.85
TFLOPS, GBPS = 1e12, 1e9


@dataclass
class Curve:
    """A rate that depends on the operator's size: (size, rate) points, log-log interpolated, flat outside."""

    points: list                      # [(size, rate)], sizes increasing

    def __call__(self, size: float) -> float:
        pts = self.points
        if len(pts) == 1 or size <= pts[0][0]:
            return pts[0][1]
        if size >= pts[-1][0]:
            return pts[-1][1]
        i = bisect.bisect_right([p[0] for p in pts], size)
        (s0, r0), (s1, r1) = pts[i - 1], pts[i]
        w = (math.log(size) - math.log(s0)) / (math.log(s1) - math.log(s0))
        return math.exp(math.log(r0) + w * (math.log(r1) - math.log(r0)))


@dataclass
class DeviceProfile:
    name: str
    description: str
    matmul: dict                      # dtype ("fp32", "bf16", "fp16", "int8") → Curve of FLOP/s by FLOPs per call
    bandwidth: Curve                  # bytes/s by bytes per call
    transcendental: float             # elements/s of exp/erf/softmax-like operators
    random: float                     # elements/s of Bernoulli / uniform sampling
    launch_s: float                   # host cost per operator
    launch_overlaps: bool             # True on GPUs (asynchronous queue), False on a CPU
    memory_bytes: int | None = None   # device memory (a default budget)
    link_bytes_per_s: float | None = None      # per-GPU collective bandwidth inside a node (NVLink or PCIe)
    node_link_bytes_per_s: float | None = None  # per-GPU bandwidth between nodes (hybrid sharding)
    fresh_threshold_bytes: int | None = None     # new storages this large come fresh from the OS (CPU)
    fresh_bytes_per_s: float | None = None       # first-touch (page fault) rate of such storages
    source: str = ""
    measured: dict = field(default_factory=dict)
    # dtype → score passes/s of the fused attention kernel beyond its products (a CPU: the per-score
    # scale/max/exp/sum runs on the cores and costs the same at any head width); None: not priced (a GPU's
    # flash kernel overlaps it with the tensor-core products).
    attention_scores: dict | None = None

    def matmul_rate(self, dtype: str, flops: float) -> float:
        curve = self.matmul.get(dtype) or self.matmul.get("bf16" if dtype in ("fp16", "fp8", "int8") else "fp32")
        return curve(flops)

    def attention_score_rate(self, dtype: str) -> float:
        rates = self.attention_scores
        return rates.get(dtype) or rates.get("bf16" if dtype in ("fp16", "fp8") else "fp32") or math.inf

    def op_seconds(self, kind: str, dtype: str, flops: float, nbytes: float, elements: float,
                   fresh: tuple = ()) -> float:
        memory = nbytes / self.bandwidth(nbytes) if nbytes else 0.0
        if self.fresh_bytes_per_s and fresh:
            memory += sum(b for b in fresh if b >= self.fresh_threshold_bytes) / self.fresh_bytes_per_s
        if kind in ("matmul", "attention"):
            work = max(flops / self.matmul_rate(dtype, flops), memory) if flops else memory
            if kind == "attention" and self.attention_scores:
                work += elements / self.attention_score_rate(dtype)
        elif kind == "transcendental":
            work = max(elements / self.transcendental, memory)
        elif kind == "random":
            work = max(elements / self.random, memory)
        else:
            work = memory
        return max(work, self.launch_s) if self.launch_overlaps else work + self.launch_s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DeviceProfile:
        d = dict(d)
        d["matmul"] = {k: Curve([tuple(p) for p in v["points"]]) for k, v in d["matmul"].items()}
        d["bandwidth"] = Curve([tuple(p) for p in d["bandwidth"]["points"]])
        return cls(**d)


def _gpu(name, description, fp32_tflops, tf16_tflops, int8_tops, bandwidth_gbps, memory_gib, link_gbps,
         node_link_gbps=50.0) -> DeviceProfile:
    """A GPU from its datasheet: dense peak fp32 (SIMT), bf16/fp16 and int8 (tensor cores), memory bandwidth."""
    return DeviceProfile(
        name=name, description=description,
        matmul={"fp32": Curve([(1.0, fp32_tflops * TFLOPS * SIMT_SHARE)]),
                "bf16": Curve([(1.0, tf16_tflops * TFLOPS * TENSOR_CORE_SHARE)]),
                "fp16": Curve([(1.0, tf16_tflops * TFLOPS * TENSOR_CORE_SHARE)]),
                "int8": Curve([(1.0, int8_tops * TFLOPS * TENSOR_CORE_SHARE)])},
        bandwidth=Curve([(1.0, bandwidth_gbps * GBPS * BANDWIDTH_SHARE)]),
        # exp/erf run at a fraction of fp32 FMA rate (special-function units: 1/4 of the FMA lanes).
        transcendental=fp32_tflops * TFLOPS / 8, random=fp32_tflops * TFLOPS / 16,
        launch_s=8e-6, launch_overlaps=True, memory_bytes=int(memory_gib * 2 ** 30),
        link_bytes_per_s=link_gbps * GBPS, node_link_bytes_per_s=node_link_gbps * GBPS,
        source="datasheet dense peak × achievable share (see memtune.memory.devices)")


# name → profile. Link: NVLink per-GPU one-direction bandwidth where the part has it, else PCIe 4.0 x16.
GPU_PROFILES = {p.name: p for p in (
    _gpu("h100", "NVIDIA H100 SXM5 80GB", 67, 989, 1979, 3350, 80, 450),
    _gpu("h200", "NVIDIA H200 SXM 141GB", 67, 989, 1979, 4800, 141, 450),
    _gpu("a100-80gb", "NVIDIA A100 SXM4 80GB", 19.5, 312, 624, 2039, 80, 300),
    _gpu("l4", "NVIDIA L4 24GB", 30.3, 121, 242, 300, 24, 25, 25),
    _gpu("rtx-4090", "NVIDIA GeForce RTX 4090 24GB (fp32-accumulate tensor rate)", 82.6, 165, 330, 1008, 24, 25, 25),
    _gpu("rtx-a6000", "NVIDIA RTX A6000 48GB", 38.7, 155, 310, 768, 48, 56, 25),
)}
ALIASES = {"a100": "a100-80gb", "4090": "rtx-4090", "a6000": "rtx-a6000", "h100-sxm": "h100"}
PROFILE_NAMES = ("cpu", *GPU_PROFILES)


def get_profile(name: str, refresh: bool = False) -> DeviceProfile:
    key = ALIASES.get(name.lower(), name.lower())
    if key == "cpu":
        return cpu_profile(refresh=refresh)
    if key not in GPU_PROFILES:
        raise ConfigError(f"unknown device profile {name!r}; known: {', '.join(PROFILE_NAMES)}")
    return GPU_PROFILES[key]


# -- the CPU, measured -------------------------------------------------------------------------------------
def _processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "memtune"
    ident = f"{_processor()}|{torch.get_num_threads()}|{torch.__version__}|{CALIBRATION_VERSION}"
    return base / f"cpu-profile-{hashlib.sha1(ident.encode()).hexdigest()[:12]}.json"


def cpu_profile(refresh: bool = False) -> DeviceProfile:
    path = cache_path()
    if not refresh and path.is_file():
        try:
            return DeviceProfile.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            pass                                 # an older or damaged cache: measure again
    profile = calibrate_cpu()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(profile.to_dict(), indent=1))
        os.replace(tmp, path)
    except OSError:
        pass                                     # a read-only home still gets a profile, just not cached
    return profile


def _rate(fn, work: float, min_seconds: float = 0.1) -> float:
    """work / seconds of one `fn()`: the fastest of many short timed groups over `min_seconds`.

    The fastest group, not the mean: on a shared machine other processes take the cores at random
    moments, and a multi-threaded kernel waits for its slowest thread; the fastest group is the kernel.
    """
    clock = step_clock()
    fn()
    t0 = clock()
    fn()
    once = max(clock() - t0, 1e-7)
    group = max(1, int(2e-3 / once))               # groups of >= 2 ms: well above the clocks' resolution
    best, spent = math.inf, 0.0
    while spent < min_seconds or best == math.inf:
        t0 = clock()
        for _ in range(group):
            fn()
        dt = clock() - t0
        spent += dt
        best = min(best, dt / group)
    return work / best


def _matmul_curve(dtype) -> Curve:
    pts = []
    for n in (64, 256, 1024):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out = torch.empty(n, n, dtype=dtype)
        pts.append((2.0 * n ** 3, _rate(lambda: torch.mm(a, b, out=out), 2.0 * n ** 3)))
    return Curve(_monotone(pts))


def _monotone(pts):
    """Rates never fall with size in the model (a timing dip at one size is noise, not a property)."""
    out, best = [], 0.0
    for s, r in pts:
        best = max(best, r)
        out.append((s, best))
    return out


def _bandwidth_curve() -> Curve:
    pts = []
    for numel in (2 ** 14, 2 ** 17, 2 ** 20, 2 ** 23, 2 ** 25):     # 64 KiB .. 128 MiB per tensor, fp32
        a, b, c = torch.randn(numel), torch.randn(numel), torch.empty(numel)
        moved = 3.0 * numel * 4
        pts.append((moved, _rate(lambda: torch.add(a, b, out=c), moved)))
    # Larger working sets fall out of cache: the rate at the largest size holds beyond it.
    return Curve(sorted(pts))


def _elementwise_rates() -> tuple[float, float]:
    x = torch.randn(2 ** 20)
    rows = torch.randn(2 ** 12, 2 ** 8)
    w, bias = torch.ones(2 ** 8), torch.zeros(2 ** 8)
    rates = [
        _rate(lambda: torch.exp(x), x.numel()),
        _rate(lambda: torch.nn.functional.gelu(x), x.numel()),
        _rate(lambda: torch.softmax(rows, -1), rows.numel()),
        _rate(lambda: torch.nn.functional.layer_norm(rows, (2 ** 8,), w, bias), rows.numel()),
    ]
    mask = torch.empty(2 ** 20)
    random = _rate(lambda: mask.bernoulli_(0.9), mask.numel())
    return sorted(rates)[len(rates) // 2], random          # the median of the four kinds


def calibrate_cpu() -> DeviceProfile:
    """Measure this CPU (a few seconds): see the module doc."""
    t0 = time.perf_counter()
    with torch.no_grad():
        matmul = {"fp32": _matmul_curve(torch.float32), "bf16": _matmul_curve(torch.bfloat16)}
        bandwidth = _bandwidth_curve()
        transcendental, random = _elementwise_rates()
    profile = DeviceProfile(
        name="cpu", description=f"{_processor()}, {torch.get_num_threads()} torch threads",
        matmul=matmul, bandwidth=bandwidth, transcendental=transcendental, random=random,
        launch_s=0.0, launch_overlaps=False, memory_bytes=None,
        source=f"measured on this machine (torch {torch.__version__})")
    profile.attention_scores = {name: _attention_score_rate(dtype)
                                for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    profile.fresh_threshold_bytes = FRESH_THRESHOLD_BYTES
    profile.fresh_bytes_per_s = _first_touch_rate()
    profile.launch_s = _launch_seconds(profile)
    profile.measured = {"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}
    return profile


def _attention_score_rate(dtype, b=1, h=8, t=256, d=2) -> float:
    """Score passes/s of PyTorch's fused CPU attention: one causal forward + backward over the score passes the
    counter gives such a call (1 + `BACKWARD_SCORE_PASSES` per score). Heads of width 2, so the time is the
    per-score work: its products are a tenth of it or less (fp32 here: 4.0 ns a pass at d = 2; at d = 64,
    6.8 ns measured against 4.0 + 3.2 ns of products at the fp32 matmul rate, which the op's FLOPs add)."""
    q, k, v = (torch.randn(b, h, t, d, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    with torch.enable_grad():
        seconds = 1.0 / _rate(step, 1.0)
    return (1 + BACKWARD_SCORE_PASSES) * (b * h * t * t // 2) / seconds


# glibc's malloc serves blocks above its mmap threshold from fresh pages of the OS, and returns them on free,
# so every such tensor pays its page faults again; the threshold adapts to freed blocks up to 32 MiB.
FRESH_THRESHOLD_BYTES = 32 * 2 ** 20


def _first_touch_rate(numel: int = 2 ** 25) -> float:
    """Bytes/s of the extra cost of writing a new 128 MiB tensor over writing an existing one."""
    buf = torch.empty(numel)
    old = 1.0 / _rate(lambda: buf.fill_(1.0), 1.0)
    new = 1.0 / _rate(lambda: torch.empty(numel).fill_(1.0), 1.0)
    extra = new - old
    return numel * 4 / extra if extra > 0 else math.inf


def _launch_seconds(profile: DeviceProfile, steps: int = 5) -> float:
    """Per-operator host cost: a tiny model's measured step minus its counted work, per operator counted.

    The tiny model (tiny-bert, d=64, batch 2 × 16) does almost no arithmetic, so its step time is the
    Python, dispatcher and autograd cost of its operators, which a larger model pays per operator too.
    """
    step = build_real_step(PlanSettings(model="tiny-bert", batch_size=2, max_length=16, device="cpu"), "full", {})
    seconds = time_step(step, warmup=2, steps=steps)
    with counting(step.optimizer) as counter:
        step()
    work = sum(profile.op_seconds(*op[1:]) for op in counter.ops)
    return max(0.0, seconds - work) / max(1, len(counter.ops))

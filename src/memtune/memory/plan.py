"""Plan a training step's memory without weights: build the model on the `meta` device and run one real step.

    from memtune.memory.plan import PlanSettings, plan
    result = plan(PlanSettings(model="t5-base", batch_size=100, max_length=128), ["full", "lora", "lst"])
    result.methods[0].peak_bytes

For each method: the model is built from its config on `meta` (shapes, no storage, no download for a
known config), wrapped by the method's own implementation (`memtune.wrap`), warmed up by one step
(optimizer state, first-batch calibrations), and one step (forward, backward, `optimizer.step()`,
`zero_grad(set_to_none=True)`) runs under the live-bytes tracker of `memtune.memory.tracker`, which
counts every storage an operator returns and frees it when the storage dies. That is the step
`measure_training_memory` measures, and the plan's peak is what `torch.cuda.max_memory_allocated()`
reports for it: checked against an H100 (benchmarks/plan_vs_cuda.py) within 3 % for fp32, AMP, bf16,
SDPA and gradient checkpointing on T5, BERT, ViT and Llama shapes. Reserved memory (what runs out) was
1-29 % above it there; the CUDA context comes on top.

What is modelled (`PlanSettings.device`, see `plan_step` and `meta_ops`):
    "cuda" (default)  AdamW / SGD with `foreach=True` (the GPU default: one more parameter-sized
                      temporary in the step), dropout saving a 1-byte mask (CUDA's fused kernel), the
                      GPU's autocast lists, fused SDPA kernels, 64 MiB of cuBLAS workspace.
    "cpu"             this machine's kernels and defaults: what `memtune.memory.measure` sees on the CPU,
                      byte for byte (the accuracy tests use it).
Precision: "fp32"; "bf16" = weights, gradients and optimizer state in bf16, no autocast; "bf16-amp" /
"fp16-amp" = fp32 master weights and an emulated autocast (`meta_ops.AutocastEmulation`; fp16 and
bf16 have equal sizes, so both use the same path).

Largest batch: the peak is linear in the batch size once the peak's phase is fixed, so the plan runs the
step at B and 2B, solves for the budget, and verifies the answer with another step (moving down or up
until the answer fits and one more sample would not, by the local slope).

Depth extrapolation (`layers=k`): a step costs Python time per operator even on meta, so a deep model
can be planned at k and 2k blocks and extrapolated linearly per block (every byte figure and the
parameter counts). Exact for methods whose structure repeats per block (full, LoRA, adapters, MEFT: within
0.1 % on BERT-large, T5-large, ViT-L, RoBERTa-large); methods whose defaults depend on depth do not
extrapolate (DTL: +10-15 %, SHERL: up to 3 %), so full depth is the default and `layers` is for sweeps.
Options that name layers (lst:keep_layers=...) are planned at full depth.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import torch

from ..methods import METHODS, ConfigError
from ..techniques.planning import plan_techniques
from .known_configs import resolve_config
from .measure import static_bytes
from .step_time import attach_step_cost, extrapolate_cost, finish_step_times
from .plan_step import (CUDA_WORKSPACE_BYTES, BlockCheckpointing, build_meta_model, config_depth,
                        default_image_size, make_batch, make_optimizer, max_positions, objective_of,
                        planning_context, run_step, warm_up, with_depth)

__all__ = ["PlanSettings", "MethodPlan", "PlanResult", "plan", "parse_method_specs", "largest_batch", "extrapolate",
           "BlockCheckpointing", "build_meta_model", "make_batch", "make_optimizer", "objective_of", "GIB"]

GIB = 2 ** 30
PRECISIONS = ("fp32", "bf16", "fp16-amp", "bf16-amp")
OPTIMIZERS = ("adamw", "sgd")
ATTENTION = ("eager", "sdpa")
DEVICES = ("cuda", "cpu")


@dataclass
class PlanSettings:
    """One workload: the model and what a training step on it looks like."""

    model: str
    batch_size: int = 8
    max_length: int = 128              # text: tokens per sequence (inputs padded to exactly this)
    image_size: int | None = None      # vision: pixels per side (default: the config's, 224 for DINOv2)
    precision: str = "fp32"
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    attn: str = "eager"
    budget_bytes: int | None = None
    num_labels: int | None = 2         # classification head size; decoders default to causal LM (see objective)
    objective: str = "auto"            # "auto": causal LM for decoders, classification otherwise
    target_length: int = 1             # T5: decoder positions (memtune's classification reads one)
    device: str = "cuda"
    layers: int | None = None          # plan at `layers` and 2·`layers` blocks and extrapolate (None: all)
    device_profile: str | None = None  # step-time profile (`memory.devices`); None: cpu for device cpu, else h100

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ConfigError(msg)

        need(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}")
        need(self.max_length >= 2, f"max length must be >= 2, got {self.max_length}")
        need(self.image_size is None or self.image_size >= 1, f"image size must be >= 1, got {self.image_size}")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(self.attn in ATTENTION, f"attention must be one of {', '.join(ATTENTION)}, got {self.attn!r}")
        need(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        need(self.objective in ("auto", "classification", "causal-lm"),
             f"objective must be auto, classification or causal-lm, got {self.objective!r}")
        need(self.budget_bytes is None or self.budget_bytes > 0, f"budget must be > 0, got {self.budget_bytes}")
        need(self.target_length >= 1, f"target length must be >= 1, got {self.target_length}")
        need(self.layers is None or self.layers >= 1, f"layers must be >= 1, got {self.layers}")
        if self.device_profile is not None:
            from .devices import get_profile
            get_profile(self.device_profile)           # unknown names fail here, listing the known ones


@dataclass
class MethodPlan:
    """One method's plan. Bytes are exact live-storage bytes of the planned step; GiB = 2^30 bytes."""

    label: str
    method: str
    options: dict
    status: str = "ok"                       # "ok" | "unsupported" (refuses this model) | "error" (failed on meta)
    message: str = ""
    trainable_params: int = 0
    total_params: int = 0
    pretrained_params: int = 0               # the pretrained model's weights (the papers' "% params" base)
    parameter_bytes: int = 0                 # every weight (numel × element size)
    gradient_bytes: int = 0                  # trainable weights' size
    optimizer_bytes: int = 0                 # optimizer state after the first step
    input_bytes: int = 0
    workspace_bytes: int = 0                 # cuBLAS workspaces (GPU only; part of start and peak)
    start_bytes: int = 0                     # live before the step: weights + optimizer state + inputs
    peak_bytes: int = 0
    activation_peak_bytes: int = 0           # peak − start (the MEFT paper's "activation memory")
    saved_activation_bytes: int = 0          # most bytes held for backward at once
    peak_split: dict = field(default_factory=dict)   # category → bytes, at the peak
    fits: bool | None = None
    max_batch_size: int | None = None        # largest batch whose planned peak fits the budget
    max_batch_peak_bytes: int | None = None  # its (verified) peak
    bytes_per_sample: float | None = None    # d(peak)/d(batch)
    gradient_checkpointing: str = "off"      # "off" | "applied" | "not needed" | "not supported"
    techniques: list = field(default_factory=list)   # the row's memory techniques (`memtune.techniques`)
    quantized_weight_bytes: int | None = None       # nf4/fp4/int8: packed weights + constants of those layers
    linear_weight_bytes: int | None = None          # the same layers' weights unquantized (fp32: ×4 per weight)
    linear_weight_fp32_bytes: int | None = None
    offload_host_bytes: int | None = None           # offload: saved tensors in pinned host memory
    notes: list = field(default_factory=list)
    seconds: float = 0.0
    # Predicted time (`memory.step_time`): seconds on `device_profile`; ratio to the full row at this batch.
    step_time_s: float | None = None
    time_vs_full: float | None = None
    max_batch_step_time_s: float | None = None
    time_per_example_s: float | None = None
    step_flops: int | None = None
    device_profile: str | None = None
    recommended: bool | None = None          # set by `memory.recommend` on the fastest fitting row
    benchmark_accuracy: dict | None = None   # `memory.recommend`: benchmark → accuracy the method measured
    cost: object = field(default=None, repr=False, compare=False)   # counted work; not written to JSON

    @property
    def trainable_pct(self) -> float:
        """Trainable parameters as a share of the pretrained model's (as the papers count)."""
        return 100.0 * self.trainable_params / max(1, self.pretrained_params)

    def gib(self, name: str) -> float:
        return getattr(self, name) / GIB

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("cost", None)
        d["trainable_pct"] = self.trainable_pct
        d["gib"] = {k: getattr(self, f"{k}_bytes") / GIB for k in
                    ("parameter", "gradient", "optimizer", "activation_peak", "peak")}
        return d


@dataclass
class PlanResult:
    settings: PlanSettings
    model_source: str
    model_type: str
    num_layers: int
    tokens: int                               # sequence length the blocks see (text: max_length; vision: patches + 1)
    methods: list[MethodPlan]
    seconds: float = 0.0

    def to_dict(self) -> dict:
        import transformers

        from .. import __version__ as memtune_version

        return {
            "settings": dataclasses.asdict(self.settings),
            "model": {"name": self.settings.model, "source": self.model_source, "model_type": self.model_type,
                      "num_layers": self.num_layers, "tokens": self.tokens},
            "units": "bytes; gib fields are GiB = 2^30 bytes",
            "methods": [m.to_dict() for m in self.methods],
            "seconds": self.seconds,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "memtune": memtune_version},
        }


# -- one method ---------------------------------------------------------------------------------------------
@dataclass
class _Step:
    peak: int
    start: int
    split: dict
    saved: int
    inputs: int
    cost: object = None          # the step's counted work (`flops.StepCost`)


class _MethodRunner:
    """A method's meta model and optimizer, stepped at any batch size."""

    def __init__(self, config, settings, method, options, prepare=None, techniques=()):
        self.settings = settings
        self.model, self.pretrained_params = build_meta_model(config, settings, method, options, prepare)
        self.techniques = plan_techniques(self.model, settings, techniques)
        self.ckpt = self.techniques.checkpointing
        self.optimizer = make_optimizer(self.model, settings)
        warm_up(self.model, self.optimizer, make_batch(self.model, settings, settings.batch_size), settings)
        self.cache: dict[int, _Step] = {}
        self.workspace = CUDA_WORKSPACE_BYTES if settings.device == "cuda" else 0

    def step(self, batch_size: int) -> _Step:
        if batch_size not in self.cache:
            batch = make_batch(self.model, self.settings, batch_size)
            r = run_step(self.model, self.optimizer, batch, self.settings, count_cost=True)
            inputs = sum(t.untyped_storage().nbytes() for t in batch.values())
            ws = self.workspace
            self.cache[batch_size] = _Step(r.peak_bytes + ws, r.start_bytes + ws, dict(r.peak_split),
                                           r.max_activation_bytes, inputs, r.extra.get("cost"))
        return self.cache[batch_size]


def _fill(plan: MethodPlan, runner: _MethodRunner, s: _Step) -> None:
    static = static_bytes(runner.model, runner.optimizer)
    plan.trainable_params, plan.total_params = runner.model.num_parameters_split()
    plan.pretrained_params = runner.pretrained_params
    plan.parameter_bytes = static["parameters"]
    plan.gradient_bytes = static["gradients"]
    plan.optimizer_bytes = static["optimizer"]
    plan.input_bytes = s.inputs
    plan.workspace_bytes = runner.workspace
    plan.start_bytes = s.start
    plan.peak_bytes = s.peak
    plan.activation_peak_bytes = s.peak - s.start
    plan.saved_activation_bytes = s.saved
    plan.peak_split = s.split


def largest_batch(step, b0: int, budget: int, max_tries: int = 8) -> tuple[int, int | None, float]:
    """Largest B with step(B).peak <= budget, from the linear model peak(B) = a + b·B, verified.

    `step(B)` returns a _Step (cached per B). Returns (B, its peak or None when B = 0, bytes per sample).
    """
    p0 = step(b0).peak
    slope = (step(2 * b0).peak - p0) / b0
    if slope <= 0:
        return 2 * b0, step(2 * b0).peak, slope
    guess = b0 + int((budget - p0) // slope)
    for _ in range(max_tries):
        if guess <= 0:
            p1 = step(1).peak
            return (1, p1, slope) if p1 <= budget else (0, None, slope)
        peak = step(guess).peak
        if peak > budget:                                # the line was optimistic: step down
            guess -= max(1, -int(-(peak - budget) // slope))
        elif budget - peak >= slope:                     # room for at least one more sample
            guess += int((budget - peak) // slope)
        else:
            return guess, peak, slope
    return (guess, step(guess).peak, slope) if guess > 0 else (0, None, slope)


# Options a method chooses from data on its first real batch; a plan has no data, so it fixes them.
PLAN_DEFAULTS = {
    # MEFT: reversible layers per segment, calibrated on the first batch; every segment stores one more
    # B×T×2d state. 1 is the calibration's floor and what it chose under autocast on an H100 (plan within
    # 3 %); in fp32 it chose 1-3 layers on random weights, where 1 plans up to 20 % high: a fit is never
    # promised that the calibration can take back. Pass meft:segment_layers=K to plan K.
    "segment_layers": lambda depth: 1,
}


def _plan_options(method: str, options: dict, depth: int) -> tuple[dict, list[str]]:
    fields = {f.name: f for f in dataclasses.fields(METHODS[method])}
    options, notes = dict(options), []
    for name, value in PLAN_DEFAULTS.items():
        if name in fields and name not in options and fields[name].default is None:
            options[name] = value(depth)
            notes.append(f"{name}={options[name]} assumed, the conservative choice (a real first batch may "
                         f"allow more; pass {method}:{name}=K to plan another)")
    return options, notes


def _plan_method(config, settings: PlanSettings, label: str, method: str, options: dict,
                 prepare=None, techniques=()) -> MethodPlan:
    t0 = time.perf_counter()
    plan = MethodPlan(label=label, method=method, options=dict(options))
    options, plan.notes = _plan_options(method, options, config_depth(config))
    plan.options = dict(options)
    from ..backbones import UnsupportedModel

    try:
        runner = _MethodRunner(config, settings, method, options, prepare, techniques)
        s = runner.step(settings.batch_size)
    except (ConfigError, UnsupportedModel) as e:
        plan.status, plan.message = "unsupported", str(e)
        return plan
    except Exception as e:  # noqa: BLE001 - one method that cannot run on meta must not sink the others
        plan.status = "error"
        plan.message = (f"could not be planned on the meta device ({type(e).__name__}: {e}); "
                        "the method may read tensor values during its step")
        return plan
    _fill(plan, runner, s)
    runner.techniques.fill(plan)
    if "init" in options or any(f.name == "init" for f in dataclasses.fields(METHODS[method])):
        init = options.get("init", getattr(runner.model.method_config, "init", None))
        plan.notes.append(f"init={init}: planned from shapes (no weights are copied or pruned on meta); "
                          "the initialisation does not change memory")
    if settings.budget_bytes is not None:
        plan.fits = plan.peak_bytes <= settings.budget_bytes
        b, peak, slope = largest_batch(runner.step, settings.batch_size, settings.budget_bytes)
        plan.max_batch_size, plan.max_batch_peak_bytes, plan.bytes_per_sample = b, peak, slope
    attach_step_cost(plan, runner, settings)
    plan.seconds = time.perf_counter() - t0
    return plan


# -- depth extrapolation ---------------------------------------------------------------------------------------
_LINEAR_FIELDS = ("trainable_params", "total_params", "pretrained_params", "parameter_bytes", "gradient_bytes",
                  "optimizer_bytes", "input_bytes", "start_bytes", "peak_bytes", "activation_peak_bytes",
                  "saved_activation_bytes")


def extrapolate(a: MethodPlan, b: MethodPlan, ka: int, kb: int, n: int, settings: PlanSettings) -> MethodPlan:
    """Per-block linear extrapolation of two plans at ka < kb blocks to n blocks."""
    out = copy.deepcopy(b)

    def lin(x, y):
        return x + (y - x) * (n - ka) / (kb - ka)

    for f in _LINEAR_FIELDS:
        setattr(out, f, int(round(lin(getattr(a, f), getattr(b, f)))))
    out.peak_split = {k: int(round(lin(a.peak_split.get(k, 0), v))) for k, v in b.peak_split.items()}
    budget = settings.budget_bytes
    out.fits = None if budget is None else out.peak_bytes <= budget
    out.max_batch_size = out.max_batch_peak_bytes = out.bytes_per_sample = None
    if budget is not None and a.bytes_per_sample is not None and b.bytes_per_sample is not None:
        slope = lin(a.bytes_per_sample, b.bytes_per_sample)
        out.bytes_per_sample = slope
        if slope > 0:
            # peak(B) = peak(B0) + (B − B0)·slope, so the largest B under the budget is:
            best = max(0, settings.batch_size + int((budget - out.peak_bytes) // slope))
            out.max_batch_size = best
            out.max_batch_peak_bytes = int(out.peak_bytes + (best - settings.batch_size) * slope) if best else None
    out.notes = list(b.notes) + [f"extrapolated per block from plans at {ka} and {kb} of {n} blocks"]
    extrapolate_cost(out, a, b, ka, kb, n)
    out.seconds = a.seconds + b.seconds
    return out


# -- the entry point --------------------------------------------------------------------------------------------
def parse_method_specs(methods):
    """'full,lora:r=16,lora+nf4+gc' or a list → [memtune.spec.MethodSpec], every spec checked up front."""
    from ..spec import parse_specs

    return parse_specs(methods)


def plan(settings: PlanSettings, methods, config=None, source: str | None = None, prepare=None) -> PlanResult:
    """Plan every method for one workload.

    `config` (a transformers config) overrides resolving `settings.model`; `prepare(hf_model)` edits each
    meta model before the method wraps it.
    """
    t0 = time.perf_counter()
    settings.validate()
    specs = parse_method_specs(methods)
    if config is None:
        config, source = resolve_config(settings.model)
    depth = config_depth(config)
    tokens = settings.max_length
    if config.model_type in ("vit", "dinov2"):
        size = settings.image_size or default_image_size(config)
        if size < config.patch_size:
            raise ConfigError(f"image size {size} is smaller than the patch size {config.patch_size}")
        tokens = (size // config.patch_size) ** 2 + 1
    elif settings.image_size is not None:
        raise ConfigError(f"--image-size applies to vision models; {settings.model} is a {config.model_type} "
                          "text model (use --max-length)")
    else:
        positions = max_positions(config)
        if positions is not None and settings.max_length > positions:
            raise ConfigError(f"max length {settings.max_length} exceeds the {positions} positions of "
                              f"{settings.model} (learned absolute position embeddings); use --max-length "
                              f"{positions} or less")
    results = []
    with planning_context():
        _plan_all(config, settings, specs, depth, results, prepare)
    finish_step_times(results, settings)
    return PlanResult(settings, source or settings.model, config.model_type, depth, tokens, results,
                      time.perf_counter() - t0)


def _plan_all(config, settings, specs, depth, results, prepare=None) -> None:
    for spec in specs:
        label, method, options, tech = spec.label, spec.method, spec.options, spec.techniques
        k = settings.layers
        uneven = config.model_type == "t5" and config.num_decoder_layers != config.num_layers
        if k is None or 2 * k >= depth or uneven:
            results.append(_plan_method(config, settings, label, method, options, prepare, tech))
            continue
        try:
            a = _plan_method(with_depth(config, k), settings, label, method, options, prepare, tech)
            b = _plan_method(with_depth(config, 2 * k), settings, label, method, options, prepare, tech)
        except ConfigError:
            a = b = None                     # a depth-dependent option (layer indices): plan at full depth
        if a is None or a.status != "ok" or b.status != "ok":
            results.append(_plan_method(config, settings, label, method, options, prepare, tech))
            continue
        results.append(extrapolate(a, b, k, 2 * k, depth, settings))

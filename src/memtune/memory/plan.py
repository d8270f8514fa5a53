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

Largest batch under a budget and depth extrapolation (`layers=k`): see `memory.scaling`.

Image-text compositions (`--model VISION+TEXT`, e.g. clip-vit-b16+t5-base; `memory.compositions`): the composed
model is built from the two parts' configs and every method runs on it as in training (LST reads the visual
tokens in its side network only, the other methods as a visual prefix of the text encoder); max_length is the
text's, image_size the vision part's, and depth, extrapolation and the objective are the text backbone's. A
vision half may be a source of pre-extracted features (`memory.visual_features`, e.g. clip-rn101-grid: LST's
CLIP-T5 form, `clip-rn101-grid+t5-base-vl`), read as an input of B×L×f. Their rows give `trainable_pct` over all
parameters (the official VL code's convention), the official visual MLP's count and, where the workload is a
paper's, its published % (`memory.paper_values`).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from ..backbones import UnsupportedModel, family_class
from ..backbones.visual_embedding import VisualEmbedding
from ..methods import METHODS, ConfigError
from ..spec import parse_specs
from ..techniques.planning import plan_techniques
from . import compositions
from .devices import get_profile
from .known_configs import resolve_config
from .measure import static_bytes
from .paper_values import attach_paper_values
from .plan_step import CUDA_WORKSPACE_BYTES, build_planned_model, make_batch, make_optimizer, objective_of, \
    planning_context, run_step, warm_up
from .plan_types import MethodPlan, PlanResult, PlanSettings
from .scaling import extrapolate, largest_batch
from .step_time import attach_step_cost, finish_step_times
from .visual_features import is_feature_source

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
        self.model, self.pretrained_params = build_planned_model(config, settings, method, options, prepare)
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
    plan.visual_params = sum(p.numel() for m in runner.model.modules() if isinstance(m, VisualEmbedding)
                             for p in m.parameters() if p.requires_grad) or None
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
    options, plan.notes = _plan_options(method, options, compositions.depth(config))
    plan.options = dict(options)
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
    if compositions.is_composition(config):
        plan.pct_of = "all"                 # the VL code's "% updated" (plan_types.MethodPlan.trainable_pct)
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


# -- the entry point --------------------------------------------------------------------------------------------
def plan(settings: PlanSettings, methods, config=None, source: str | None = None, prepare=None) -> PlanResult:
    """Plan every method for one workload.

    `config` (a transformers config) overrides resolving `settings.model`; `prepare(hf_model)` edits each
    meta model before the method wraps it.
    """
    t0 = time.perf_counter()
    settings.validate()
    if settings.device_profile is not None:
        get_profile(settings.device_profile)           # unknown names fail here, listing the known ones
    specs = parse_specs(methods)
    if config is None:
        config, source = resolve_config(settings.model)
    family = family_class(config)
    tokens = _planned_tokens(config, settings)
    results = []
    with planning_context():
        _plan_all(config, settings, specs, results, prepare)
    finish_step_times(results, settings)
    attach_paper_values(results, config, objective_of(config, settings))
    modality = "image_text" if compositions.is_composition(config) else family.modality
    return PlanResult(settings, source or settings.model, config.model_type, compositions.depth(config), tokens,
                      results, time.perf_counter() - t0, modality,
                      compositions.visual_source(config, settings.image_size), _visual_tokens(config))


def _visual_tokens(config) -> int | None:
    """V, the visual tokens a composition's side network or prefix reads (None for other models)."""
    return config.grid * config.grid if compositions.is_composition(config) else None


def _planned_tokens(config, settings: PlanSettings) -> int:
    """Tokens per example the blocks see, after checking that the planned input suits the model."""
    if compositions.is_composition(config):
        vc = config.vision_config
        if settings.image_size is not None and is_feature_source(vc):
            raise ConfigError(f"--image-size does not apply to {settings.model}: its visual input is pre-extracted "
                              f"features (a {vc.grid[0]}×{vc.grid[1]} grid of width {vc.hidden_size})")
        if settings.image_size is not None and settings.image_size < vc.patch_size:
            raise ConfigError(f"image size {settings.image_size} is smaller than the vision part's patch size "
                              f"{vc.patch_size}")
        config = config.text_config             # the text backbone's tokens; the image is the vision part's
        settings = dataclasses.replace(settings, image_size=None)
    family = family_class(config)
    if family.modality == "image":
        size = settings.image_size or family.default_image_size(config)
        if size < config.patch_size:
            raise ConfigError(f"image size {size} is smaller than the patch size {config.patch_size}")
        return family.image_tokens(config, size)
    if settings.image_size is not None:
        raise ConfigError(f"--image-size applies to vision models; {settings.model} is a {config.model_type} "
                          "text model (use --max-length)")
    positions = family.max_positions(config)
    if positions is not None and settings.max_length > positions:
        raise ConfigError(f"max length {settings.max_length} exceeds the {positions} positions of "
                          f"{settings.model} (learned absolute position embeddings); use --max-length "
                          f"{positions} or less")
    return settings.max_length


def _plan_all(config, settings, specs, results, prepare=None) -> None:
    depth = compositions.depth(config)
    for spec in specs:
        label, method, options, tech = spec.label, spec.method, spec.options, spec.techniques
        k = settings.layers
        if k is None or 2 * k >= depth or not compositions.stacks_equally_deep(config):
            results.append(_plan_method(config, settings, label, method, options, prepare, tech))
            continue
        try:
            a = _plan_method(compositions.with_depth(config, k), settings, label, method, options, prepare, tech)
            b = _plan_method(compositions.with_depth(config, 2 * k), settings, label, method, options, prepare,
                             tech)
        except ConfigError:
            a = b = None                     # a depth-dependent option (layer indices): plan at full depth
        if a is None or a.status != "ok" or b.status != "ok":
            results.append(_plan_method(config, settings, label, method, options, prepare, tech))
            continue
        results.append(extrapolate(a, b, k, 2 * k, depth, settings))

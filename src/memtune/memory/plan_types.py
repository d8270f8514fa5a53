"""What the planner is asked and what it answers: `PlanSettings` (one workload), `MethodPlan` (one method's
bytes, parameters and predicted time), `PlanResult` (every method for the workload). Plain data, importing
nothing of the planner, so the planner's modules and its callers share them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..methods import ConfigError
from ..version import __version__ as memtune_version

GIB = 2 ** 30
PRECISIONS = ("fp32", "bf16", "fp16-amp", "bf16-amp")
OPTIMIZERS = ("adamw", "sgd")
OBJECTIVES = ("auto", "classification", "causal-lm", "seq2seq")
ATTENTION = ("eager", "sdpa")
DEVICES = ("cuda", "cpu")


@dataclass
class PlanSettings:
    """One workload: the model and what a training step on it looks like."""

    # Each field's metadata (help, choices) is its `memtune plan` flag (`memtune.cli.fields`).
    model: str = field(metadata={"help": "known name (t5-base, t5-3b, bert-base, llama-7b, minilm, ...; an unknown "
                                         "name lists them all), a config.json or model folder, a hub id, or "
                                         "VISION+TEXT (clip-vit-b16+t5-base; LST's CLIP-T5: "
                                         "clip-rn101-grid+t5-base-vl)"})
    batch_size: int = 8
    max_length: int = field(default=128, metadata={"help": "text: tokens per sequence (padded to exactly this)"})
    image_size: int | None = field(default=None, metadata={"help": "vision: pixels per side (default: the model's)"})
    precision: str = field(default="fp32", metadata={
        "choices": PRECISIONS, "help": "fp32; bf16 = bf16 weights; *-amp = fp32 weights + autocast"})
    optimizer: str = field(default="adamw", metadata={"choices": OPTIMIZERS, "help": "sgd = SGD with momentum 0.9"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the blocks that the backward pass goes through"})
    attn: str = field(default="eager", metadata={
        "choices": ATTENTION, "help": "eager (as the papers) or sdpa (modelled as a fused GPU kernel)"})
    budget_bytes: int | None = field(default=None, metadata={"help": "GPU memory to fit, in bytes"})
    num_labels: int | None = field(default=2, metadata={"help": "classification classes"})
    objective: str = field(default="auto", metadata={
        "choices": OBJECTIVES, "help": "auto: causal LM for decoders, classification otherwise; seq2seq: "
                                       "encoder-decoders' text-to-text loss through the tied LM head"})
    target_length: int = field(default=1, metadata={
        "help": "encoder-decoders: decoder positions per example (seq2seq: the target tokens)"})
    device: str = field(default="cuda", metadata={
        "choices": DEVICES, "help": "what to model: a GPU (default) or this CPU (optimizer and autocast defaults "
                                    "differ)"})
    layers: int | None = field(default=None, metadata={
        "help": "plan at N and 2N blocks and extrapolate per block (faster for deep models; default: all blocks)"})
    device_profile: str | None = field(default=None, metadata={
        "help": "device profile for predicted step times (default: cpu with --device cpu, else h100; cpu is "
                "measured on this machine once and cached)"})

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
        need(self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        need(self.budget_bytes is None or self.budget_bytes > 0, f"budget must be > 0, got {self.budget_bytes}")
        need(self.target_length >= 1, f"target length must be >= 1, got {self.target_length}")
        need(self.layers is None or self.layers >= 1, f"layers must be >= 1, got {self.layers}")


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
    # What `trainable_pct` divides by: "pretrained" (the pretrained model's weights, as the GLUE papers count) or
    # "all" (every parameter of the wrapped model, trainable ones included: the official VL code's "% updated",
    # `L:VL/trainer_base.py:244-264`, used for image-text compositions; specs/vl.md §2.6).
    pct_of: str = "pretrained"
    paper_pct: float | None = None           # the paper's % for this method and workload, where known
    paper_source: str | None = None          # where paper_pct comes from, with its status (paper_values.py)
    # Image-text compositions: the trainable visual embedding's parameters (LST's side input or the prefix), and
    # on T5 the trainable count with the official CLIP-T5 visual MLP's (f + 11)·d in their place (paper_values).
    visual_params: int | None = None
    official_trainable_params: int | None = None
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
        """Trainable parameters as a share of the pretrained model's (pct_of "pretrained", the GLUE papers'
        count) or of all parameters, trainable included (pct_of "all", the VL code's)."""
        base = self.total_params if self.pct_of == "all" else self.pretrained_params
        return 100.0 * self.trainable_params / max(1, base)

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
    modality: str = "text"                    # what the model reads: "text", "image" or "image_text"
    visual_source: str | None = None          # image_text: how the visual tokens are made, in words
    visual_tokens: int | None = None          # image_text: V, the visual tokens per example

    def to_dict(self) -> dict:
        import transformers

        return {
            "settings": dataclasses.asdict(self.settings),
            "model": {"name": self.settings.model, "source": self.model_source, "model_type": self.model_type,
                      "num_layers": self.num_layers, "tokens": self.tokens, "modality": self.modality,
                      "visual_source": self.visual_source, "visual_tokens": self.visual_tokens},
            "units": "bytes; gib fields are GiB = 2^30 bytes",
            "methods": [m.to_dict() for m in self.methods],
            "seconds": self.seconds,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "memtune": memtune_version},
        }

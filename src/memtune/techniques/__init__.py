"""Memory techniques that combine with any method: gradient checkpointing, quantized base weights, offloading,
the chunked LM loss.

    model = memtune.wrap(base, "lora", num_labels=2, techniques="nf4+gc")       # QLoRA with checkpointing
    MemoryTechniques(gradient_checkpointing=True, quantize="nf4").names()        # ('nf4', 'gc')

    gc        BlockCheckpointing of every backbone block the backward pass crosses (`checkpointing`)
    nf4 fp4   4-bit frozen base weights (NF4 with double quantization, FP4), bitsandbytes (`quantize`)
    int8      LLM.int8 frozen base weights, bitsandbytes
    offload   saved activations wait in pinned CPU memory during the step (CUDA only, `offload`)
    chunked_ce  the causal-LM / seq2seq loss over the vocabulary taken a chunk of tokens at a time, its
              gradient computed in the forward: no N×V logits are kept (`chunked_loss`)

Each applies to a wrapped model after the method built it (`apply_techniques`), so no method changes.
Where a technique makes no sense it is refused with one line saying why (`ConfigError`):
    gc        with linear (the backbone runs without a graph), the side networks whose backbone runs
              without one (lst, qst; checked on the wrapped model by a one-token dry forward for the rest)
              and meft (its reversible layers already recompute activations)
    nf4 ...   with full and bitfit (they train the base weights, which quantization freezes)
    offload   on a machine without CUDA (the activations are in host memory already)
    chunked_ce  for classification, regression and retrieval heads (no vocabulary-wide loss to chunk)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..methods.base import ConfigError
from .checkpointing import BlockCheckpointing
from .quantize import QUANTIZE_KINDS, quantize_backbone, quiet_bnb_import_warning

quiet_bnb_import_warning()

TECHNIQUES = ("gc", *QUANTIZE_KINDS, "offload", "chunked_ce")

# Refusals that depend on the method alone: technique → {method name: reason}.
_NO_GRAPH = "its backbone runs without an autograd graph, so there are no block activations to recompute"
REFUSED = {
    "gc": {"linear": _NO_GRAPH, "lst": _NO_GRAPH + " (the side network's blocks are 1/r as wide)",
           "qst": _NO_GRAPH + " (the side network's blocks are 1/r as wide)",
           **{m: "its reversible layers already recompute activations in backward"
              for m in ("meft", "meft1", "meft2", "meft3")}},
    "quantize": {"full": "full fine-tuning trains every base weight, and quantized base weights are frozen; "
                         "use lora+{kind} (QLoRA) or a side network",
                 "bitfit": "bitfit trains the base layers' bias terms inside the layers that would be quantized; "
                           "use lora+{kind} or a side network"},
}


@dataclass
class MemoryTechniques:
    gradient_checkpointing: bool = False
    quantize: str | None = None                 # "nf4" | "fp4" | "int8" | None
    offload_activations: bool = False
    chunked_ce: bool = False

    def __post_init__(self):
        if self.quantize is not None and self.quantize not in QUANTIZE_KINDS:
            raise ConfigError(f"unknown quantization {self.quantize!r}; allowed: {', '.join(QUANTIZE_KINDS)}")

    @classmethod
    def from_names(cls, names, where: str | None = None) -> "MemoryTechniques":
        """('nf4', 'gc') or 'nf4+gc' → MemoryTechniques; unknown or repeated names refused."""
        if isinstance(names, str):
            names = [n for n in names.split("+") if n.strip()]
        place = f" in {where!r}" if where else ""
        seen, quantize = set(), None
        for n in (n.strip() for n in names):
            if n not in TECHNIQUES:
                raise ConfigError(f"unknown technique {n!r}{place}; allowed: {', '.join(TECHNIQUES)}")
            if n in seen:
                raise ConfigError(f"technique {n!r} given twice{place}")
            if n in QUANTIZE_KINDS:
                if quantize is not None:
                    raise ConfigError(f"{quantize} and {n} both quantize the base weights{place}; pick one")
                quantize = n
            seen.add(n)
        return cls("gc" in seen, quantize, "offload" in seen, "chunked_ce" in seen)

    @classmethod
    def coerce(cls, value) -> "MemoryTechniques":
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        return cls.from_names(value)

    @classmethod
    def for_loading(cls, saved: dict | None) -> "MemoryTechniques":
        """What `memtune.load` re-applies from an adapter_config's record: the quantized base and gc (offload
        and the chunked loss are properties of the training step, not of the adapter)."""
        t = cls.coerce(saved)
        return cls(t.gradient_checkpointing, t.quantize)

    def names(self) -> tuple[str, ...]:
        return tuple(n for n, on in ((self.quantize, self.quantize is not None), ("gc", self.gradient_checkpointing),
                                     ("offload", self.offload_activations), ("chunked_ce", self.chunked_ce)) if on)

    def __bool__(self) -> bool:
        return bool(self.names())

    def to_dict(self) -> dict:
        return asdict(self)

    def check_method(self, method: str) -> None:
        """Refuse combinations that make no sense for `method` (by name; see the module doc)."""
        if self.gradient_checkpointing and method in REFUSED["gc"]:
            raise ConfigError(f"gc is not needed for {method}: {REFUSED['gc'][method]}")
        if self.quantize and method in REFUSED["quantize"]:
            reason = REFUSED["quantize"][method].format(kind=self.quantize)
            raise ConfigError(f"{self.quantize} cannot be combined with {method}: {reason}")

    def check_device(self, cuda: bool | None = None) -> None:
        cuda = torch.cuda.is_available() if cuda is None else cuda
        if self.offload_activations and not cuda:
            raise ConfigError("offload moves saved activations from GPU to CPU memory; with no CUDA GPU here they "
                              "are in CPU memory already, so it is meaningless (drop +offload / "
                              "--offload-activations, or plan it for a GPU with `memtune plan`)")


def apply_techniques(model, techniques, *, make_layer=None, recompute_context=None, preserve_rng_state=True,
                     dry_check: bool = True, offload_hooks=None, cuda: bool | None = None, check: bool = True):
    """Apply `techniques` to a wrapped MemtuneModel in place: quantize, then checkpoint, then offload; the
    chunked loss is a switch of the model's forward (`model.chunked_ce`).

    Records `model.memory_techniques`, `model.block_checkpointing` (or None) and `model.activation_offload`.
    The planner passes its meta stand-ins (`make_layer`, `recompute_context`, `offload_hooks`) and no dry
    check (its warm-up step counts the checkpointed calls instead). Returns the model.
    """
    t = MemoryTechniques.coerce(techniques)
    method = model.method_config.name
    if check:
        t.check_method(method)
    if offload_hooks is None:
        t.check_device(cuda)
    if t.chunked_ce and not model.per_token:
        raise ConfigError(f"chunked_ce chunks the vocabulary-wide loss of the causal-lm and seq2seq objectives; "
                          f"this model's objective is {model.objective} (its head's logits are small already)")
    if t.quantize:
        quantize_backbone(model, t.quantize, make_layer)
    ckpt = None
    if t.gradient_checkpointing:
        ckpt = BlockCheckpointing(model.backbone, preserve_rng_state=preserve_rng_state,
                                  recompute_context=recompute_context)
        if dry_check and not _checkpoints_any_block(model, ckpt):
            ckpt.remove()
            raise ConfigError(f"gc is not needed for {method}: no backbone block runs with an autograd graph "
                              "in its training step")
    offload = None
    if t.offload_activations:
        from .offload import ActivationOffload

        offload = ActivationOffload(model, offload_hooks)
    model.memory_techniques = t
    model.chunked_ce = t.chunked_ce
    model.block_checkpointing = ckpt
    model.activation_offload = offload
    return model


def _checkpoints_any_block(model, ckpt: BlockCheckpointing) -> bool:
    """One forward of a 1-example batch with autograd on: does any block call get checkpointed?

    Run in eval mode (no dropout draws, no first-batch calibrations or trunk caches), so it changes no state.
    """
    bb = model.backbone
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return False
    batch = bb.planning_batch(bb.config, 1, 4, device=device)           # 4 tokens, or one default-size image
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            model(**batch)
    finally:
        for m, mode in modes:
            m.training = mode
    applied = ckpt.applied
    ckpt.applied = ckpt.skipped = 0
    return applied > 0

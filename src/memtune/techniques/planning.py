"""The memory techniques on the planner's meta model (`memtune plan --methods lora+nf4+gc,lst+nf4`).

    planned = plan_techniques(model, settings, ("nf4", "gc"))     # after `plan_step.build_planned_model`
    ...warm-up and the planned step...
    planned.fill(method_plan)                                      # status and byte figures of the row

What stands in for what on the meta device:
    gc       the real `BlockCheckpointing`, recomputing under the planner's kernel stand-ins; no RNG
             state is stashed (meta tensors have no generator; on a GPU it is a few bytes per block)
    nf4 ...  `quantize_meta.QuantizedLinearStandIn` in place of each bitsandbytes layer, with the same
             storage: the packed weight and the quantization constants are frozen Parameters of the
             stand-in, so every byte figure of the plan (weights, start, peak) includes them
    offload  `offload.ModelledOffload`, modelled for CUDA: the saved tensors leave the GPU when the forward
             pass packs them and come back one at a time in backward; the pinned host bytes they take
             are reported separately (`offload_host_bytes`). On `device="cpu"` the row is refused.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from . import MemoryTechniques, apply_techniques
from .offload import ModelledOffload
from .quantize import frozen_block_linears
from .quantize_meta import QuantizedLinearStandIn


@dataclass
class PlannedTechniques:
    techniques: MemoryTechniques
    checkpointing: object = None                 # BlockCheckpointing or None
    offload: ModelledOffload | None = None
    linear_bytes: int = 0                        # the quantized layers' weights before quantization
    linear_fp32_bytes: int = 0                   # the same weights in fp32 (4 bytes each)
    model: object = None

    def quantized_bytes(self) -> int:
        """Packed weights + constants of every stand-in (bias terms excluded, as in `linear_bytes`)."""
        total = 0
        for m in self.model.modules():
            if isinstance(m, QuantizedLinearStandIn):
                total += sum(p.numel() * p.element_size() for n, p in m.named_parameters() if n != "bias")
        return total

    def fill(self, plan) -> None:
        """The row's technique figures; call right after the step at the planned batch size."""
        plan.techniques = list(self.techniques.names())
        if self.checkpointing is not None:
            plan.gradient_checkpointing = self.checkpointing.status()
        if self.techniques.quantize:
            plan.quantized_weight_bytes = self.quantized_bytes()
            plan.linear_weight_bytes = self.linear_bytes
            plan.linear_weight_fp32_bytes = self.linear_fp32_bytes
            plan.notes.append(f"{self.techniques.quantize}: block linears planned as bitsandbytes layers "
                              "(packed weights and quantization constants; the trunk computes in the weights' "
                              "former dtype)")
        if self.offload is not None:
            plan.offload_host_bytes = self.offload.peak_host_bytes
            plan.notes.append(f"offload: {self.offload.peak_host_bytes / 2 ** 30:.2f} GiB of saved tensors in "
                              "pinned host memory per step (not part of the GPU peak)")


def plan_techniques(model, settings, names=()) -> PlannedTechniques:
    """Apply the row's techniques (and the plan-wide `settings.gradient_checkpointing`) to a meta model."""
    from ..memory.plan_step import backward_modes

    t = MemoryTechniques.from_names(names)
    if settings.gradient_checkpointing:
        t = replace(t, gradient_checkpointing=True)
    t.check_device(cuda=settings.device == "cuda")
    planned = PlannedTechniques(t, model=model)
    if t.quantize:
        for _, _, linear in frozen_block_linears(model.backbone):
            planned.linear_bytes += linear.weight.numel() * linear.weight.element_size()
            planned.linear_fp32_bytes += linear.weight.numel() * 4
    planned.offload = ModelledOffload() if t.offload_activations else None
    # The method refusals were checked when the spec was parsed; the plan-wide gc flag applies to every row
    # and reports "not needed" rather than refusing.
    apply_techniques(model, t, make_layer=QuantizedLinearStandIn.like, recompute_context=backward_modes,
                     preserve_rng_state=False, dry_check=False, offload_hooks=planned.offload, check=False)
    planned.checkpointing = model.block_checkpointing
    return planned

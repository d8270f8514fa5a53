"""4-bit / 8-bit frozen base weights through bitsandbytes: NF4 (+ double quantization), FP4, LLM.int8.

    swapped = quantize_backbone(model, "nf4")      # after `memtune.wrap`: method code stays untouched

Which layers: the `nn.Linear` modules inside the backbone's blocks (`backbone.blocks`, T5's
`backbone.decoder_blocks` too) whose weight does not require grad. Embeddings, norms, the LM head, the
task head and every trainable module stay as they are; a LoRA / IA3 layer that peft injected keeps its
trainable parts and gets a quantized `base_layer` (QLoRA is lora + nf4). Quantizing after the method has
wrapped the model is what keeps the methods unchanged: LST copies (pruned) backbone weights into its side
network at construction, from the full-precision weights.

    nf4 / fp4   bnb.nn.Linear4bit: weights packed two per byte, one absmax per 64-weight block, and those
                absmax values quantized again to 8 bits per 256-block (double quantization, one fp32
                scale per 256-block plus an offset): about 4.13 bits per weight
    int8        bnb.nn.Linear8bitLt (LLM.int8, outlier threshold 6): one int8 per weight + an fp32 scale
                per output row

The forward pass dequantizes each weight to the compute dtype (the input's: fp32, or bf16 for bf16
models) and multiplies; the backward pass computes the gradient of the input only (the weights are frozen),
so gradient still flows through a quantized block to whatever trains before it (SHERL's late layers,
DTL's added-into blocks, LoRA in earlier blocks).
"""
from __future__ import annotations

import torch
from torch import nn

from ..methods.base import ConfigError

QUANTIZE_KINDS = ("nf4", "fp4", "int8")
BLOCKSIZE = 64                # weights per absmax (bitsandbytes' 4-bit default)
NESTED_BLOCKSIZE = 256        # absmax values per second-level fp32 scale (double quantization)
INT8_THRESHOLD = 6.0          # LLM.int8's outlier threshold


def block_stacks(backbone) -> list[nn.ModuleList]:
    """The backbone's block lists: the (encoder) stack, and T5's decoder stack."""
    stacks = [backbone.blocks]
    if "decoder_blocks" in dir(type(backbone)):
        stacks.append(backbone.decoder_blocks)
    return stacks


def frozen_block_linears(backbone) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, module) of every plain `nn.Linear` in the blocks whose weight and bias are frozen.

    Layers the model class keeps in full precision under quantization (`_keep_in_fp32_modules`, e.g. T5's
    FFN output `wo`, whose caller casts its input to the weight's dtype) stay as they are, as in
    transformers' own 4-bit loading."""
    keep = set(getattr(backbone.model, "_keep_in_fp32_modules", None) or ())
    found = []
    for stack in block_stacks(backbone):
        for block in stack:
            for parent in block.modules():
                for name, child in parent.named_children():
                    if type(child) is nn.Linear and name not in keep and not child.weight.requires_grad and \
                            (child.bias is None or not child.bias.requires_grad):
                        found.append((parent, name, child))
    return found


def _copy_hooks(old: nn.Module, new: nn.Module) -> None:
    """Forward hooks a method registered on the old layer (adapters) keep working on the new one."""
    for attr in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                 "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
        if getattr(old, attr, None):
            getattr(new, attr).update(getattr(old, attr))


def bnb_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """A frozen bitsandbytes copy of `linear`, quantized on the linear's device."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        raise ConfigError(f"{kind}: quantized base weights need bitsandbytes (pip install bitsandbytes)") from None
    device, dtype = linear.weight.device, linear.weight.dtype
    weight = linear.weight.detach()
    with torch.device("cpu" if device.type == "meta" else device):
        if kind in ("nf4", "fp4"):
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=dtype, compress_statistics=True, quant_type=kind)
            q.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type=kind,
                                         blocksize=BLOCKSIZE)
            # On CPUs with AVX512-BF16, bnb repacks a 4-bit weight into an inference-only layout the first
            # time it runs in eval mode without grad (DTL's trunk, evaluation); that layout then bypasses
            # autograd in later training steps. Keep the one layout that trains.
            q.support_avx512bf16_for_cpu = False
        else:
            q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=INT8_THRESHOLD)
            q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    q = q.to(device)                                   # quantizes (Params4bit / Int8Params on .to)
    q.train(linear.training)
    return q


def quantize_backbone(model, kind: str, make_layer=None) -> int:
    """Replace the frozen linears in `model.backbone`'s blocks by quantized ones; returns how many.

    `make_layer(linear, kind)` builds each replacement (default: bitsandbytes; the planner passes its meta
    stand-in, `quantize_meta.QuantizedLinearStandIn.like`)."""
    if kind not in QUANTIZE_KINDS:
        raise ConfigError(f"unknown quantization {kind!r}; allowed: {', '.join(QUANTIZE_KINDS)}")
    make_layer = make_layer or bnb_linear
    targets = frozen_block_linears(model.backbone)
    if not targets:
        raise ConfigError(f"{kind}: the backbone's blocks hold no frozen nn.Linear to quantize "
                          f"(method {model.method_config.name!r} trains them or they are not linear layers)")
    for parent, name, linear in targets:
        new = make_layer(linear, kind)
        _copy_hooks(linear, new)
        setattr(parent, name, new)
    return len(targets)


def quiet_bnb_import_warning() -> None:
    """bitsandbytes' CPU backend warns on import (peft imports it too) that an optional kernel package is
    missing; its fallback is the one used here, so only that logger is quieted."""
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

"""`memtune merge`: fold a trained adapter into the base weights and write a standalone transformers checkpoint.

    memtune merge --model minilm --adapter runs/x --out merged/

Which methods can be merged: those whose trained computation IS the base architecture with other weights.
  lora, ia3       peft's merge: W ← W + (α/r)·B·A, or W ← W·diag(l) / l ⊙ (W·x)
  bitfit, full    the trained weights are the base model's own
  linear          the base model is unchanged; only the head is new
Not mergeable: bottleneck `adapter` (x + up(gelu(down(x))) is not linear in x, so no weight matrix equals
it) and the side-network methods (lst, dtl, dtl+, sherl, meft*, qst), whose computation is not the base
architecture at all (a side network or a reversible coupling runs beside the frozen backbone).

What OUT holds:
  causal LM:       config.json + model.safetensors + tokenizer: `AutoModelForCausalLM.from_pretrained(OUT)`.
  classification:  the encoder (config.json with id2label/label2id, model.safetensors, tokenizer or image
                   processor files; `AutoModel.from_pretrained(OUT)`) plus memtune_head.safetensors
                   (`weight` C×F, `bias` C) and memtune_head.json naming the pooling. memtune pools token
                   states itself (mean over real tokens; ViT: [CLS ; mean of patches]), which no
                   transformers *ForSequenceClassification head computes, so the head is kept beside the
                   encoder instead of being forced into a head class with other arithmetic:
                       h = AutoModel.from_pretrained(OUT)(**inputs).last_hidden_state       # B×T×d
                       logits = pool(h, attention_mask) @ weight.T + bias                   # B×C
Before OUT is kept, the merged model is reloaded from disk and its logits are compared with the adapter's.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

MERGEABLE = ("lora", "ia3", "bitfit", "full", "linear")
HEAD_WEIGHTS, HEAD_CONFIG = "memtune_head.safetensors", "memtune_head.json"


def why_not_mergeable(method: str) -> str | None:
    if method in MERGEABLE:
        return None
    if method == "adapter":
        return ("bottleneck adapters compute x + up(gelu(down(x))): the GELU between the two projections makes "
                "the update non-linear in x, so no change of the base weight matrices reproduces it")
    return (f"{method} trains a side network (or a reversible coupling) that runs beside the frozen backbone: its "
            "computation is not the base architecture, so there are no base weights to fold it into")


def merged_base(model) -> torch.nn.Module:
    """The wrapped Hugging Face module with the method folded in (peft layers merged and removed)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    hf = model.backbone.model
    tuned = [(name, m) for name, m in hf.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in tuned:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(hf.get_submodule(parent_name) if parent_name else hf, child, layer.get_base_layer())
    return hf


def sample_batch(model, loaded) -> dict[str, torch.Tensor]:
    """A few real-looking inputs to compare the adapter and the merged checkpoint on."""
    if loaded.modality == "image":
        return model.backbone.example_batch(3)
    texts = ["a short example sentence", "another, rather longer example of a text to compare", "x"]
    enc = loaded.preprocessor(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}


def merge(base_model: str, adapter, out) -> Path:
    """Write the merged checkpoint into `out`; returns it. Raises ArgumentError where it cannot be merged."""
    from .api import load
    from .backbones import backbone_for
    from .checkpoint import read_adapter_config
    from .models import load_model
    from .train import ArgumentError

    saved = read_adapter_config(adapter)
    method = saved.get("method")
    reason = why_not_mergeable(method)
    if reason:
        raise ArgumentError(f"cannot merge {method!r}: {reason}; load it with memtune.load instead "
                            f"(mergeable: {', '.join(MERGEABLE)})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArgumentError(f"--out {out} exists and is not an empty folder; choose a new folder")
    loaded = load_model(base_model)
    model = load(loaded, adapter).eval()
    batch = sample_batch(model, loaded)
    with torch.no_grad():
        expected = model(**batch).logits                      # B×C (or B×T×V for a causal LM)
    hf = merged_base(model)
    causal = model.objective == "causal-lm"
    if not causal:
        hf.config.id2label = dict(model.id2label) if model.id2label else {i: str(i) for i in range(model.num_labels)}
        hf.config.label2id = {n: i for i, n in hf.config.id2label.items()}
    try:
        out.mkdir(parents=True, exist_ok=True)
        hf.save_pretrained(out, safe_serialization=True)
        if loaded.preprocessor is not None:
            loaded.preprocessor.save_pretrained(out)
        if not causal:
            _save_head(model, out)
        got = merged_logits(out, batch, backbone_for)
        err = (got - expected).abs().max().item()
        # float32: the merged W + ΔW rounds differently from W·x + ΔW·x by ~1e-7 relative per layer.
        if err > 1e-5 * max(1.0, expected.abs().max().item()):
            raise ArgumentError(f"the merged checkpoint's logits differ from the adapter's by {err:.2e}; "
                                f"nothing was kept (model type {hf.config.model_type})")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out


def _save_head(model, out: Path) -> None:
    from safetensors.torch import save_file

    save_file({"weight": model.head.weight.detach().contiguous(), "bias": model.head.bias.detach().contiguous()},
              str(out / HEAD_WEIGHTS))
    bb = model.backbone
    (out / HEAD_CONFIG).write_text(json.dumps({
        "pooling": bb.pooling, "family": bb.family,
        "num_labels": model.num_labels, "id2label": {str(k): v for k, v in (model.id2label or {}).items()},
        "logits": "pool(AutoModel(OUT)(**inputs).last_hidden_state) @ weight.T + bias",
    }, indent=2) + "\n")


def merged_logits(out: Path, batch: dict, backbone_for) -> torch.Tensor:
    """Logits of the checkpoint in `out`, reloaded from disk (the pooling through memtune's backbone code)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from .models import drop_unused_parts, model_class_for

    hf = model_class_for(AutoConfig.from_pretrained(out)).from_pretrained(out).eval()
    drop_unused_parts(hf)
    with torch.no_grad():
        if not (out / HEAD_WEIGHTS).exists():
            return hf(**batch).logits                                  # causal LM: B×T×V
        head = load_file(str(out / HEAD_WEIGHTS))
        backbone = backbone_for(hf)
        h, ctx = backbone(batch)                                       # B×T×d
        return backbone.pool(h, ctx) @ head["weight"].T + head["bias"]


def cmd_merge(ns) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()       # the reload check's load report and shard bars are not for the user
    hf_logging.disable_progress_bar()
    out = merge(ns.model, ns.adapter, ns.out)
    print(f"merged {ns.adapter} into {out} (load it with transformers; see {out / HEAD_CONFIG} for the head, "
          "if any)")
    return 0

"""CUDA memory and time of one training step per method, at the literature's settings (docs/methods/anchors.md §4.2).

Each (shape, method) runs in a fresh process: random weights built from the architecture's config on the
GPU (memory does not depend on the weight values), inputs padded to exactly L, AdamW, 3 warm-up steps,
peak stats reset, 5 measured steps (max_memory_allocated / max_memory_reserved, activation peak =
peak − allocated at step start, median step time).

    python benchmarks/cuda_memory.py --out benchmarks/cuda_memory.json [--only minilm-b32-l128]
"""
from __future__ import annotations

import argparse
import os
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DEVICE = os.environ.get("BENCH_DEVICE", "cuda")  # "cpu" only for a quick smoke test of this script

SHAPES = {
    # name: (family, config kwargs)
    "minilm": ("bert", dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                            intermediate_size=1536, max_position_embeddings=512)),
    "bert-base": ("bert", dict()),
    "t5-base": ("t5", dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, vocab_size=32128,
                           decoder_start_token_id=0, pad_token_id=0)),
    "vit-b16": ("vit", dict(image_size=224, patch_size=16)),
    "smollm2-135m": ("llama", dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                   tie_word_embeddings=True, pad_token_id=0)),
}

SIDE = ["lst", "dtl", "dtl+", "sherl", "meft1", "meft2", "meft3"]
SUITES = {
    "minilm-b32-l128-fp32": ("minilm", 32, 128, "fp32", ["full", "linear", "bitfit", "lora", "ia3", "adapter", *SIDE]),
    "t5base-b100-l128-fp32": ("t5-base", 100, 128, "fp32", ["full", "linear", "adapter", "lora", "ia3", "lst", "sherl"]),
    "vitb16-b32-224-fp16amp": ("vit-b16", 32, 224, "fp16", ["full", "linear", "bitfit", "lora", "adapter", *SIDE]),
    "bertbase-b16-l512-fp32": ("bert-base", 16, 512, "fp32", ["full", "linear", "lora", "lst", "sherl", "meft1",
                                                               "meft2", "meft3"]),
    "smollm2-b8-l256-bf16amp": ("smollm2-135m", 8, 256, "bf16", ["full", "lora", "lst", "sherl", "meft1"]),
    "smollm2-b8-l1024-bf16amp": ("smollm2-135m", 8, 1024, "bf16", ["full", "lora", "lst", "sherl", "meft1"]),
}


def build(shape: str):
    import torch
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, T5Config, T5Model, ViTConfig, ViTModel

    family, kw = SHAPES[shape]
    cls, cfg = {"bert": (BertModel, BertConfig), "t5": (T5Model, T5Config), "vit": (ViTModel, ViTConfig),
                "llama": (LlamaForCausalLM, LlamaConfig)}[family]
    config = cfg(**kw)
    config._attn_implementation = "eager"  # as the papers measured
    with torch.device(DEVICE):
        model = cls(config)
    from memtune.models import drop_unused_parts

    drop_unused_parts(model)
    return model


def one(shape: str, method: str, batch: int, length: int, precision: str) -> dict:
    import torch

    import memtune
    from memtune.memory.measure import measure_training_memory, training_step

    torch.manual_seed(0)
    model = build(shape)
    causal = SHAPES[shape][0] == "llama"
    wrapped = memtune.wrap(model, method, num_labels=None if causal else 2, name=shape).to(DEVICE)
    bb = wrapped.backbone
    data = bb.example_batch(batch, length, device=DEVICE)
    if "input_ids" in data:
        data["input_ids"] = data["input_ids"] % 1000 + 5
    data["labels"] = data["input_ids"].clone() if causal else torch.randint(0, 2, (batch,), device=DEVICE)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-4)
    autocast = None
    if precision != "fp32":
        autocast = torch.autocast(DEVICE, dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    report = measure_training_memory(wrapped, data, opt, warmup=3, steps=5, autocast=autocast)
    times = []
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    for _ in range(10):
        sync()
        t0 = time.perf_counter()
        training_step(wrapped, data, opt, autocast)
        sync()
        times.append(time.perf_counter() - t0)
    trainable, total = wrapped.num_parameters_split()
    return {"shape": shape, "method": method, "batch": batch, "length": length, "precision": precision,
            "trainable_params": trainable, "total_params": total, **report.to_dict(),
            "step_time_s": statistics.median(times), "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu",
            "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/cuda_memory.json")
    ap.add_argument("--only", default=None, help="comma list of suites")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(one(*json.loads(a.one))), flush=True)
        return
    suites = a.only.split(",") if a.only else list(SUITES)
    results = []
    for s in suites:
        shape, batch, length, precision, methods = SUITES[s]
        for m in methods:
            t0 = time.time()
            p = subprocess.run([sys.executable, __file__, "--one", json.dumps([shape, m, batch, length, precision])],
                               capture_output=True, text=True, timeout=300)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line:
                rec = json.loads(line[7:])
            else:
                tail = [ln for ln in (p.stderr or "").splitlines() if ln.strip()][-1:] or [f"exit {p.returncode}"]
                rec = {"shape": shape, "method": m, "batch": batch, "length": length, "precision": precision,
                       "error": tail[0][-300:]}
            rec["suite"] = s
            results.append(rec)
            peak = rec.get("peak_bytes")
            print(f"{s:28s} {m:8s} " + (f"peak {peak / 2**30:7.3f} GiB  act {rec['activation_peak_bytes'] / 2**30:7.3f}"
                                         f"  {rec['step_time_s'] * 1000:8.1f} ms" if peak else f"ERROR {rec['error']}")
                  + f"  ({time.time() - t0:.0f} s)", flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

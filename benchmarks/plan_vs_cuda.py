"""Check `memtune plan` against `torch.cuda.max_memory_allocated()` on a real GPU.

    python benchmarks/plan_vs_cuda.py [--quick] [--cases 0,2] [--out benchmarks/plan_vs_cuda.json]
    python benchmarks/plan_vs_cuda.py --replan RUN.json [RUN.json ...]   # no GPU: re-plan recorded rows
    python benchmarks/plan_vs_cuda.py --against benchmarks/cuda_memory.json  # no GPU: plan cuda_memory.py's runs

For each case (model config, workload, method) the planner runs on the meta device (modelling a GPU:
foreach AdamW, the GPU's autocast lists, fused SDPA), and the same model is built with random weights on
the GPU (memory does not depend on the values), wrapped by the same method and measured with
`memtune.memory.measure.measure_training_memory` (2 warm-up steps, peak statistics reset, 1 measured
step). Prints plan / measured for the peak and the activation peak (peak − allocated at step start).
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from memtune.memory.known_configs import resolve_config
from memtune.memory.measure import measure_training_memory
from memtune.memory.plan import PlanSettings, plan
from memtune.memory.plan_step import build_planned_model, make_batch, make_optimizer
from memtune.memory.real_step import real_batch
from memtune.spec import parse_specs
from memtune.techniques.checkpointing import BlockCheckpointing

CASES = [
    # (model, settings overrides, methods)
    ("t5-base", dict(batch_size=100, max_length=128),
     "full,adapter,lora:r=32,lst:keep_layers=1,2,3,5,6,7,9,10,11,linear"),
    ("t5-base", dict(batch_size=100, max_length=128), "bitfit+bias"),
    ("bert-base", dict(batch_size=32, max_length=128), "full,lora,lst,sherl,meft1,dtl"),
    ("bert-base", dict(batch_size=32, max_length=128, precision="bf16-amp"), "full,lora,lst,meft1"),
    ("bert-base", dict(batch_size=32, max_length=128, attn="sdpa"), "full,lora,lst"),
    ("bert-base", dict(batch_size=32, max_length=128, gradient_checkpointing=True), "full,lora"),
    ("vit-b16", dict(batch_size=32, precision="fp16-amp"), "full,lora,dtl,lst"),
    ("smollm2-135m", dict(batch_size=8, max_length=256, precision="bf16-amp", attn="sdpa"), "full,lora,lst,sherl"),
    ("smollm2-135m", dict(batch_size=8, max_length=256, precision="bf16"), "full,lora"),
]
QUICK = CASES[:2]


def add_biases(hf) -> None:
    """T5 has no bias terms; the LST paper's BitFit row most likely trained biases added to every linear."""
    for m in hf.modules():
        if isinstance(m, nn.Linear) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_features, device=m.weight.device, dtype=m.weight.dtype))


def measure_cuda(config, settings: PlanSettings, method: str, options: dict, prepare=None) -> dict:
    device = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    model, _ = build_planned_model(config, settings, method, options, prepare, device=device)
    if settings.gradient_checkpointing:
        BlockCheckpointing(model.backbone)
    batch = real_batch(make_batch(model, settings, settings.batch_size), device)
    opt = make_optimizer(model, settings)
    autocast = None
    if settings.precision.endswith("-amp"):
        autocast = torch.autocast("cuda", dtype=torch.float16 if settings.precision == "fp16-amp" else torch.bfloat16)
    r = measure_training_memory(model, batch, opt, warmup=2, steps=1, autocast=autocast)
    # Wrapped models can sit in reference cycles (forward-hook closures): drop every name, then collect,
    # so the next case does not start with this one's weights still allocated.
    del model, opt, batch
    gc.collect()
    torch.cuda.empty_cache()
    return {"peak_bytes": r.peak_bytes, "start_bytes": r.start_bytes, "activation_peak_bytes": r.activation_peak_bytes,
            "reserved_bytes": r.reserved_bytes}


def replan(files, out) -> int:
    """Recompute the plan side of recorded rows (the CUDA side stays as measured) and rewrite `out`."""
    rows, meta = [], {}
    for f in files:
        d = json.loads(Path(f).read_text())
        meta = {k: v for k, v in d.items() if k != "rows"}
        rows += d["rows"]
    groups: dict = {}
    for r in rows:
        key = (r["model"], json.dumps(r["settings"], sort_keys=True), r["method"].endswith("+bias"))
        groups.setdefault(key, []).append(r)
    for (model, over, bias), rs in groups.items():
        specs = [r["method"].removesuffix("+bias") for r in rs]
        result = plan(PlanSettings(model=model, **json.loads(over)), specs, prepare=add_biases if bias else None)
        for r, mp in zip(rs, result.methods):
            r.update(plan_peak_bytes=mp.peak_bytes, plan_activation_peak_bytes=mp.activation_peak_bytes,
                     plan_start_bytes=mp.start_bytes, peak_ratio=mp.peak_bytes / r["cuda_peak_bytes"],
                     activation_ratio=mp.activation_peak_bytes / max(1, r["cuda_activation_peak_bytes"]))
            print(f"{model:13s} {over:70s} {r['method'][:22]:22s} peak {r['peak_ratio']:.3f} "
                  f"act {r['activation_ratio']:.3f}")
    Path(out).write_text(json.dumps({**meta, "replanned_with_torch": torch.__version__, "rows": rows}, indent=2)
                         + "\n")
    return 0


def against(records_file, out) -> int:
    """Plan the runs of benchmarks/cuda_memory.py (a fresh process per run, 3 warm-ups, 5 measured steps)."""
    records = json.loads(Path(records_file).read_text())
    precision = {"fp32": "fp32", "fp16": "fp16-amp", "bf16": "bf16-amp"}
    groups: dict = {}
    for r in records:
        groups.setdefault((r["shape"], r["batch"], r["length"], r["precision"]), []).append(r)
    rows = []
    for (shape, batch, length, prec), rs in groups.items():
        kw = dict(model=shape, batch_size=batch, precision=precision[prec])
        kw["image_size" if shape.startswith("vit") else "max_length"] = length
        result = plan(PlanSettings(**kw), [r["method"] for r in rs])
        for r, mp in zip(rs, result.methods):
            row = {"shape": shape, "batch": batch, "length": length, "precision": prec, "method": r["method"],
                   "plan_peak_bytes": mp.peak_bytes, "cuda_peak_bytes": r["peak_bytes"],
                   "plan_activation_peak_bytes": mp.activation_peak_bytes,
                   "cuda_activation_peak_bytes": r["activation_peak_bytes"],
                   "peak_ratio": mp.peak_bytes / r["peak_bytes"],
                   "activation_ratio": mp.activation_peak_bytes / r["activation_peak_bytes"], "notes": mp.notes}
            rows.append(row)
            print(f"{shape:13s} B{batch:<4d} L{length:<5d} {prec:5s} {r['method']:8s} peak "
                  f"{mp.peak_bytes / 2**30:7.3f} / {r['peak_bytes'] / 2**30:7.3f} GiB = {row['peak_ratio']:.3f}  "
                  f"act {row['activation_ratio']:.3f}", flush=True)
    within = sum(abs(r["peak_ratio"] - 1) <= 0.05 for r in rows)
    print(f"peak within 5 %: {within} / {len(rows)}")
    path = Path(out)
    data = json.loads(path.read_text()) if path.exists() else {"rows": []}
    data["independent"] = {"source": str(records_file), "rows": rows, "peak_within_5_percent": [within, len(rows)]}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the LST-table workload")
    ap.add_argument("--cases", default=None, help="comma list of case numbers (0-based) to run")
    ap.add_argument("--out", default="benchmarks/plan_vs_cuda.json")
    ap.add_argument("--replan", nargs="+", default=None,
                    help="recorded JSON files: keep their CUDA figures, recompute the plan with this code")
    ap.add_argument("--against", default=None,
                    help="records of benchmarks/cuda_memory.py (eager attention, AMP for fp16/bf16): plan the same "
                         "runs and add the comparison to --out under 'independent'")
    ns = ap.parse_args(argv)
    if ns.against:
        return against(ns.against, ns.out)
    if ns.replan:
        return replan(ns.replan, ns.out)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare", file=sys.stderr)
        return 1
    rows = []
    cases = QUICK if ns.quick else CASES
    if ns.cases:
        cases = [CASES[int(i)] for i in ns.cases.split(",")]
    for model, over, methods in cases:
        prepare = None
        if methods == "bitfit+bias":
            methods, prepare = "bitfit", add_biases
        settings = PlanSettings(model=model, **over)
        config, _ = resolve_config(model)
        t0 = time.perf_counter()
        result = plan(settings, methods, prepare=prepare)
        for spec, mp in zip(parse_specs(methods), result.methods):
            label, method = spec.label, spec.method
            if mp.status != "ok":
                print(f"{model:13s} {label:20s} unsupported: {mp.message}")
                continue
            try:
                real = measure_cuda(config, settings, method, mp.options, prepare)
            except Exception as e:  # report and go on: one failing case should not hide the others
                print(f"{model:13s} {label:20s} measurement failed: {type(e).__name__}: {e}")
                continue
            row = {"model": model, "settings": over, "method": label + ("+bias" if prepare else ""),
                   "plan_peak_bytes": mp.peak_bytes, "plan_activation_peak_bytes": mp.activation_peak_bytes,
                   "plan_start_bytes": mp.start_bytes, **{"cuda_" + k: v for k, v in real.items()},
                   "device": torch.cuda.get_device_name()}
            row["peak_ratio"] = mp.peak_bytes / real["peak_bytes"]
            row["activation_ratio"] = mp.activation_peak_bytes / max(1, real["activation_peak_bytes"])
            rows.append(row)
            tag = ",".join(f"{k}={v}" for k, v in over.items())
            print(f"{model:13s} {tag:55s} {row['method'][:22]:22s} peak plan {mp.peak_bytes / 2**30:7.3f} GiB "
                  f"cuda {real['peak_bytes'] / 2**30:7.3f} ({row['peak_ratio']:.3f})  act plan "
                  f"{mp.activation_peak_bytes / 2**30:7.3f} cuda {real['activation_peak_bytes'] / 2**30:7.3f} "
                  f"({row['activation_ratio']:.3f})", flush=True)
        print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

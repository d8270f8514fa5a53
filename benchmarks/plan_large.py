"""Decoder fine-tuning rows that users compare when memory is short, planned on the meta device.

    python benchmarks/plan_large.py        # writes benchmarks/plan_large.json

Workloads (causal LM, AdamW, one training step; planned at 2 and 4 blocks and extrapolated to full depth,
`PlanSettings.layers`, since every row's structure repeats per block):
- SmolLM2-135M, batch 8 × 512, fp32, modelling this CPU (`device="cpu"`, eager backbone attention): the plan
  equals the live-bytes tracker to the byte on CPU (tests/memory), so this is the CPU tracker's figure
  without running 12 real steps at 8 × 512.
- SmolLM2-135M, batch 8 × 1024, bf16 weights, SDPA, on the H100 profile.
- A 7B Llama (LLaMA-2-7B shape) at batch 4 × 2048 and a 70B one (Llama-3.1-70B shape) at batch 1 × 2048, bf16,
  SDPA, H100 profile: which rows fit in 12 / 24 / 80 GiB.
Rows: LoRA and full fine-tuning with and without checkpointing, QLoRA (`lora+nf4`, with `+gc`), and the side
methods on the same 4-bit base; on the bf16 workloads also QLoRA + checkpointing and QST with the chunked loss
(`+chunked_ce`) in both rows. Times are predicted (`memory.step_time`), not measured.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from memtune.memory.plan import PlanSettings, plan

HERE = Path(__file__).resolve().parent
GIB = 2 ** 30
BUDGETS_GIB = (12, 24, 80)
SIDE = ["lst+nf4", "sherl+nf4", "qst+nf4", "qst:tap_storage=int8+nf4", "qst:downsample=avgpool+nf4"]
# The same comparison with the chunked loss in both rows (no vocabulary-wide logits), and QST with checkpointed
# side steps on parameter-free pooled taps: what stays is the d/r-wide side state and one block's recompute.
CHUNKED = ["lora+nf4+gc+chunked_ce", "qst+nf4+chunked_ce",
           "qst:side_checkpointing=true:downsample=avgpool+nf4+chunked_ce"]
WORKLOADS = [
    ("smollm2-135m, 8 × 512, fp32, CPU", dict(model="smollm2-135m", batch_size=8, max_length=512, precision="fp32",
                                                device="cpu", layers=2),
     ["full", "full+gc", "lora", "lora+gc", "lora+nf4", "lora+nf4+gc", "lst", "sherl", "meft1", "qst"] + SIDE),
    ("smollm2-135m, 8 × 1024, bf16, H100", dict(model="smollm2-135m", batch_size=8, max_length=1024, precision="bf16",
                                                  attn="sdpa", device_profile="h100", layers=2),
     ["full", "lora+gc", "lora+nf4", "lora+nf4+gc", "meft1"] + SIDE + CHUNKED),
    ("llama-7b, 4 × 2048, bf16, H100", dict(model="llama-7b", batch_size=4, max_length=2048, precision="bf16",
                                              attn="sdpa", device_profile="h100", layers=2),
     ["full", "lora", "lora+gc", "lora+nf4", "lora+nf4+gc"] + SIDE + CHUNKED),
    ("llama-3.1-70b, 1 × 2048, bf16, H100", dict(model="llama-3.1-70b", batch_size=1, max_length=2048,
                                                   precision="bf16", attn="sdpa", device_profile="h100", layers=2),
     ["lora+gc", "lora+nf4+gc"] + SIDE),
]


def main() -> None:
    torch.set_num_threads(1)
    out = {"budgets_gib": list(BUDGETS_GIB), "workloads": []}
    for title, settings, rows in WORKLOADS:
        t0 = time.time()
        result = plan(PlanSettings(**settings), rows)
        print(f"{title}: {len(rows)} rows in {time.time() - t0:.0f} s", file=sys.stderr)
        records = []
        for mp in result.methods:
            rec = {k: v for k, v in asdict(mp).items() if k not in ("peak_split", "options")}
            rec["peak_split"] = mp.peak_split
            rec["fits_gib"] = {str(b): mp.status == "ok" and mp.peak_bytes <= b * GIB for b in BUDGETS_GIB}
            records.append(rec)
            print(f"  {mp.label:30s} {mp.status:5s} peak {mp.peak_bytes / GIB:8.3f} GiB  "
                  f"activation {mp.activation_peak_bytes / GIB:8.3f}  step {mp.step_time_s or float('nan'):.3f} s",
                  file=sys.stderr)
        out["workloads"].append({"title": title, "settings": settings, "records": records})
    (HERE / "plan_large.json").write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()

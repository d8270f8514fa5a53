"""CPU benchmarks behind benchmarks/RESULTS.md: `memtune compare` at the README table's settings.

    python benchmarks/run_cpu.py [--only minilm|dinov2]

Each comparison trains every method in a fresh process (see memtune/compare.py); the run folders (with
adapters) go to runs/bench/, and the small results (JSON, Markdown table, plot) are copied here.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Every method, and next to them what users run when memory is short: checkpointing and a 4-bit base (QLoRA).
ALL = ("full,full+gc,linear,bitfit,lora,lora+gc,lora+nf4+gc,ia3,adapter,lst,dtl,dtl+,sherl,meft1,meft2,meft3,"
       "qst")
RUNS = {
    # The README's results table: MiniLM + Rotten Tomatoes, one epoch of 3,000 examples at batch 16 × 64;
    # memory of one step at batch 32 × 128. (`make demo` runs the same comparison on fewer examples.)
    "minilm-rotten-tomatoes": ["--model", "minilm", "--task", "rotten-tomatoes", "--batch-size", "16",
                               "--max-length", "64", "--train-limit", "3000", "--test-limit", "1000", "--epochs", "1",
                               "--memory-batch-size", "32", "--memory-max-length", "128",
                               "--methods", ALL],
    # DINOv2-S on a fixed Fashion-MNIST subset at 112 px (4x cheaper than 224 px on CPU).
    "dinov2s-fashion-mnist": ["--model", "dinov2-s", "--task", "fashion-mnist", "--image-size", "112",
                              "--batch-size", "16", "--train-limit", "2000", "--test-limit", "400", "--max-steps", "80",
                              "--methods", "full,full+gc,linear,lora,lora+gc,lora+nf4+gc,lst,dtl,sherl,meft1,qst"],
    # SmolLM2-135M as a causal LM on the review texts; memory of one step at batch 8 × 512 (CPU tracker),
    # QLoRA (+ checkpointing) next to the side methods on the same 4-bit base.
    "smollm2-causal-lm": ["--model", "smollm2-135m", "--task", "rotten-tomatoes", "--objective", "causal-lm",
                          "--batch-size", "8", "--max-length", "64", "--train-limit", "400", "--test-limit", "100",
                          "--max-steps", "20", "--memory-batch-size", "8", "--memory-max-length", "512",
                          "--methods", "full,lora,lora+gc,lora+nf4+gc,lst+nf4,sherl+nf4,meft1,qst,qst+nf4"],
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None)
    a = ap.parse_args()
    for name, flags in RUNS.items():
        if a.only and a.only not in name:
            continue
        out = Path("runs/bench") / name
        cmd = [sys.executable, "-m", "memtune", "compare", *flags, "--out", str(out), "--no-progress"]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True)
        dest = HERE / name
        dest.mkdir(exist_ok=True)
        for f in ("results.json", "results.md", "memory_vs_accuracy.png", "memory_vs_time.png"):
            if (out / f).exists():
                shutil.copy(out / f, dest / f)


if __name__ == "__main__":
    main()

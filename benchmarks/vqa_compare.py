"""A small real check of training on the offline VQA task (memtune issue #18): `memtune compare` on digits-vqa/B1
(is this a {c}? yes/no; neither the question nor the image alone beats 0.5) with DINOv2-S beside MiniLM.

    python benchmarks/vqa_compare.py [--methods full,lora,lst] [--max-steps 150] [--train-limit 1000]

The baselines read the image as a trainable prefix of the text backbone (docs/methods/vl.md §4 mode B); LST keeps it
in its side network (mode A). Images are resized to 112 px (DINOv2's 14-px patches: an 8×8 grid, pooled to the
6×6 visual tokens). Run folders go to runs/bench/vqa-digits-b1/; the records and the table are copied to
benchmarks/vqa-digits-b1/. This is a check that the whole path learns on real weights, not a tuned result:
above 0.5 on B1 needs both modalities.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = "vqa-digits-b1"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="full,lora,lst")
    parser.add_argument("--max-steps", default="150")
    parser.add_argument("--train-limit", default="1000")
    parser.add_argument("--test-limit", default="300")
    args = parser.parse_args()
    runs = Path("runs/bench") / NAME
    out = HERE / NAME
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "memtune", "compare", "--model", "dinov2-s+minilm", "--task", "digits-vqa/B1",
               "--image-size", "112", "--max-length", "24", "--batch-size", "16",
               "--train-limit", args.train_limit, "--test-limit", args.test_limit, "--max-steps", args.max_steps,
               "--methods", args.methods, "--out", str(runs), "--json", str(out / "results.json"), "--no-progress"]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    for name in ("results.md",):
        if (runs / name).exists():
            shutil.copy(runs / name, out / name)


if __name__ == "__main__":
    main()

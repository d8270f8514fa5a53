"""SHERL's retrieval form on real weights (memtune issue #18): DINOv2-S and MiniLM as two frozen towers, each with
its MTSA and last block, trained on digits-captions (class-level captions of sklearn's digits) with the VSE∞
hinge summed over all negatives; recall@1/5/10 both ways (a hit is an item of the caption's class) before and
after training.

    python benchmarks/retrieval_captions.py [--max-steps 300] [--seeds 0,1]

Writes benchmarks/retrieval-digits-captions/results.json (one record per seed, with the untrained model's
recall in "before") and results.md. Images at 56 px, as in benchmarks/vqa_compare.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAME = "retrieval-digits-captions"
KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", default="300")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--lr", default="5e-4")
    args = parser.parse_args()
    out = HERE / NAME
    out.mkdir(parents=True, exist_ok=True)
    records, commands = [], []
    for seed in args.seeds.split(","):
        run = Path("runs/bench") / NAME / f"seed-{seed}"
        command = [sys.executable, "-m", "memtune", "train", "--model", "dinov2-s+minilm", "--task", "digits-captions",
                   "--method", "sherl", "--hardest-negative", "false", "--image-size", "56", "--max-length", "16",
                   "--batch-size", "32", "--train-limit", "2000", "--test-limit", "500", "--max-steps", args.max_steps,
                   "--lr", args.lr, "--seed", seed, "--eval-before", "--no-progress", "--overwrite", "--out", str(run)]
        commands.append("memtune " + " ".join(command[3:]))
        print(commands[-1], flush=True)
        subprocess.run(command, check=True)
        m = json.loads((run / "metrics.json").read_text())
        records.append({"seed": int(seed), "after": {k: m[k] for k in KEYS},
                        "before": {k: m["before"][k] for k in KEYS}, "steps": m["steps"],
                        "trainable_params": m["trainable_params"], "step_time_s": m.get("step_time_s"),
                        "versions": m.get("versions")})
    (out / "results.json").write_text(json.dumps({"commands": commands, "records": records}, indent=2) + "\n")
    rows = ["| seed | | " + " | ".join(KEYS) + " |", "|---" * (len(KEYS) + 2) + "|"]
    for r in records:
        for when in ("before", "after"):
            rows.append(f"| {r['seed']} | {'untrained' if when == 'before' else 'trained'} | "
                        + " | ".join(f"{r[when][k]:.3f}" for k in KEYS) + " |")
    (out / "results.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

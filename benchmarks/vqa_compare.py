"""Training on the offline VQA task (memtune issue #18), with its single-modality controls: `memtune compare` on
one digits-vqa template with DINOv2-S beside MiniLM, then every trained run evaluated again with its images
blanked and with its questions emptied (`memtune eval --ablate`; docs/methods/vl.md §5.11: a model that reads both
modalities beats both controls by ≥ 15 points, and the controls stay within 3 points of chance).

    python benchmarks/vqa_compare.py [--template B1] [--methods full,lora,lora+gc,lst,sherl] [--seeds 0]
                                     [--max-steps 1200] [--lr X]

Templates (data/vqa.py): B1 "is this a {c}?" (yes/no) names a class the model must check against the image; B3
"is it an even digit?" / "... less than five?" (and their complements: yes/no) asks one of two attributes of
the digit. Either modality alone scores 0.5 on both.

The baselines read the image as a trainable prefix of the text backbone (docs/methods/vl.md §4 mode B); LST keeps it
in its side network (mode A); SHERL reads a frozen prefix through its early route and adds a trainable visual
projection before the late layer. Images are resized to 56 px (the spec's size for the 8×8 digits; DINOv2's
14-px patches give a 4×4 grid, max-pooled to the 6×6 visual tokens; 112 px costs about 5× the step time on CPU).
B1 asks the model to bind a word to an image: in short runs every method sits at chance (loss ln 2) for several
epochs before it learns, so the defaults train 1,200 steps on 2,000 questions. Methods that need different
learning rates run as separate invocations (`--lr`), each adding its rows. Run folders go to
runs/bench/vqa-digits-<template>/<invocation>/; the compare records, the controls and the table are written to
benchmarks/vqa-digits-<template>/ (b1, b3, ...). A rerun adds its rows to the records already there (a row of the
same label is replaced), with the ratios to full recomputed over the joined rows.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from memtune.compare import add_ratios, markdown_table, settings_line  # noqa: E402
from memtune.data.vqa import load_vqa_task  # noqa: E402
from memtune.spec import parse_specs  # noqa: E402
from memtune.sweep import ci95_half_width  # noqa: E402

TEMPLATES = ("B1", "B2", "B3", "B4")   # one image, both modalities needed (docs/methods/vl.md §6)
MARGIN, NEAR_CHANCE = 0.15, 0.03
ABLATIONS = ("image", "question")


def run_folders(label: str, runs: Path, seeds: list[int]) -> list[Path]:
    """The run folder of each seed of one compare row (compare's layout: <run_name>[/seed-N])."""
    base = runs / parse_specs([label])[0].run_name
    return [base / f"seed-{s}" for s in seeds] if len(seeds) > 1 else [base]


def evaluate_ablated(folder: Path, ablation: str) -> float:
    """Accuracy of the run in `folder` on its test split with one modality removed."""
    settings = json.loads((folder / "metrics.json").read_text())["settings"]
    out = subprocess.run([sys.executable, "-m", "memtune", "eval", "--model", settings["model"], "--adapter",
                          str(folder), "--ablate", ablation, "--no-progress"], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["accuracy"]


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    return sum(values) / len(values), ci95_half_width(values)


def fmt(values: list[float]) -> str:
    m, h = mean_ci(values)
    return f"{m:.3f}" + (f" ± {h:.3f}" if h is not None else "")


def control_rows(records: list[dict], runs: Path, chance: float) -> list[dict]:
    """Per trained row: accuracy with both modalities and under each ablation, per seed; the §5.11 verdicts."""
    rows = []
    for r in records:
        if "error" in r:
            continue
        seeds = r.get("seeds") or [r["settings"]["seed"]]
        both = r.get("accuracy_per_seed") or [r["accuracy"]]
        row = {"label": r["label"], "lr": r["settings"].get("lr"), "seeds": seeds, "both": both}
        for a in ABLATIONS:
            print(f"  {r['label']}: --ablate {a}", file=sys.stderr, flush=True)
            row[a] = [evaluate_ablated(f, a) for f in run_folders(r["label"], runs, seeds)]
        worst_control = max(mean_ci(row[a])[0] for a in ABLATIONS)
        row["beats_controls_by"] = mean_ci(both)[0] - worst_control
        row["passes"] = bool(row["beats_controls_by"] >= MARGIN and
                             all(abs(mean_ci(row[a])[0] - chance) <= NEAR_CHANCE for a in ABLATIONS))
        rows.append(row)
    return rows


def controls_table(rows: list[dict], chance: float) -> str:
    head = ("| method | lr | both modalities | image blanked | question emptied | margin over the better control "
            f"| §5.11 (≥ {MARGIN * 100:.0f} pts; controls {chance:.2f} ± {NEAR_CHANCE:.2f}) |\n" + "|---" * 7 + "|")
    body = [f"| {r['label']} | {r.get('lr') or 'default'} | {fmt(r['both'])} | {fmt(r['image'])} | "
            f"{fmt(r['question'])} | {r['beats_controls_by'] * 100:+.1f} pts | {'yes' if r['passes'] else 'no'} |"
            for r in rows]
    return "\n".join([head, *body])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", default="B1", choices=TEMPLATES)
    parser.add_argument("--methods", default="full,lora,lora+gc,lst,sherl")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--max-steps", default="1200")
    parser.add_argument("--train-limit", default="2000")
    parser.add_argument("--test-limit", default="300")
    parser.add_argument("--image-size", default="56")
    parser.add_argument("--lr", default=None, help="default: each method's own")
    args = parser.parse_args()
    # One run folder per invocation, so that invocations may run side by side.
    name = f"vqa-digits-{args.template.lower()}"
    runs = Path("runs/bench") / name / (args.methods.replace(",", "_") + (f"-lr-{args.lr}" if args.lr else ""))
    out = HERE / name
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    command = [sys.executable, "-m", "memtune", "compare", "--model", "dinov2-s+minilm",
               "--task", f"digits-vqa/{args.template}", "--image-size", args.image_size, "--max-length", "24",
               "--batch-size", "16", "--train-limit", args.train_limit, "--test-limit", args.test_limit,
               "--max-steps", args.max_steps, "--methods", args.methods, "--out", str(runs), "--no-progress"]
    command += ["--seeds", args.seeds] if len(seeds) > 1 else ["--seed", args.seeds]
    command += ["--lr", args.lr] if args.lr else []
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    new = json.loads((runs / "results.json").read_text())
    # Either modality alone scores the template's chance rate, as the generator defines it.
    new["chance"] = load_vqa_task(f"digits-vqa/{args.template}").chance[args.template]
    new["controls"] = control_rows(new["records"], runs, new["chance"])
    results = out / "results.json"
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # parallel invocations join their rows one at a time
        join_and_write(new, results, out)


def join_and_write(new: dict, results: Path, out: Path) -> None:
    if results.exists():                      # join with the rows of earlier runs (same label: the new one)
        old = json.loads(results.read_text())
        labels = {r["label"] for r in new["records"]}
        new["records"] = [r for r in old["records"] if r["label"] not in labels] + new["records"]
        new["controls"] = [c for c in old.get("controls", []) if c["label"] not in labels] + new["controls"]
        new["earlier_commands"] = old.get("earlier_commands", []) + [old["command"]]
        add_ratios(new["records"])
    results.write_text(json.dumps(new, indent=2) + "\n")
    table = (settings_line(new["records"]) + "\n\n" + markdown_table(new["records"]) +
             "\n\nSingle-modality controls (mean ± 95 % half-width over seeds):\n\n" +
             controls_table(new["controls"], new["chance"]))
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

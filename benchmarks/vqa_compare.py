"""Training on the offline VQA task (memtune issue #18), with its single-modality controls: `memtune compare` on
one digits-vqa template with DINOv2-S beside MiniLM, then every trained run evaluated again with its images
blanked and with its questions emptied (`memtune eval --ablate`; docs/methods/vl.md §5.11: a model that reads both
modalities beats both controls by ≥ 15 points, and the controls stay within 3 points of chance).

    python benchmarks/vqa_compare.py [--template B1] [--methods full,lora,lora+gc,lst,sherl] [--seeds 0]
                                     [--max-steps 1200] [--lr X] [--test-limit all]
    python benchmarks/vqa_compare.py --template B3 --rescore all   # score the saved runs again, on all 500 questions

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

The controls are scored on the whole test split (500 questions per template) by default. On a class-stratified
subset the answers keep their shares but each wording need not: on B3's first 300 questions a rule that reads
only the question scores anywhere in 0.467–0.533, so an image-blanked control 3.3 points from chance there can
come from the question alone. The table gives that range per row; `--rescore` measures saved runs again.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from memtune.compare import add_ratios, markdown_table, settings_line  # noqa: E402
from memtune.data import load_task  # noqa: E402
from memtune.data.vqa import load_vqa_task  # noqa: E402
from memtune.sweep import ci95_half_width  # noqa: E402

TEMPLATES = ("B1", "B2", "B3", "B4")   # one image, both modalities needed (docs/methods/vl.md §6)
MARGIN, NEAR_CHANCE = 0.15, 0.03
# The training shape of every run (vqa_init_probe.py probes the same inputs).
MODEL, IMAGE_SIZE, MAX_LENGTH, BATCH_SIZE, TRAIN_LIMIT = "dinov2-s+minilm", 56, 24, 16, 2000
ABLATIONS = ("image", "question")


def evaluate_run(folder: Path, model: str, ablation: str | None, test_limit: str | None = None) -> tuple[float, int]:
    """(accuracy, questions scored) of the run of `model` in `folder` on its test split, with one modality removed
    (`ablation`) or both kept (None); `test_limit` ("all" or a count) rescores on more questions than it
    trained with."""
    command = [sys.executable, "-m", "memtune", "eval", "--model", model, "--adapter", str(folder), "--no-progress"]
    command += ["--ablate", ablation] if ablation else []
    command += ["--test-limit", test_limit] if test_limit else []
    stdout = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    out = json.loads(stdout.strip().splitlines()[-1])
    return out["accuracy"], out["eval_examples"]


def question_only_range(template: str, seed: int, test_limit: int) -> tuple[float, float]:
    """The lowest and highest accuracy any rule that reads only the question reaches on these test questions
    (per question string, answer its minority or its majority answer). On B3's 500 test questions each wording
    is asked 50/50, so the range is one point, 0.5; a stratified subset keeps the answers' shares but not each
    wording's, so its range is wider (300 questions: 0.467–0.533), and an image-blanked control anywhere in it
    reads no image."""
    test = load_task(f"digits-vqa/{template}", seed=seed, test_limit=test_limit).test
    counts: dict[str, Counter] = defaultdict(Counter)
    for ex in test:
        counts[ex["text"]][ex["label"]] += 1
    low = sum(min(c.values()) if len(c) > 1 else 0 for c in counts.values())
    high = sum(max(c.values()) for c in counts.values())
    return low / len(test), high / len(test)


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    return sum(values) / len(values), ci95_half_width(values)


def fmt(values: list[float]) -> str:
    m, h = mean_ci(values)
    return f"{m:.3f}" + (f" ± {h:.3f}" if h is not None else "")


def control_rows(records: list[dict], template: str, chance: float, test_limit: str | None = None) -> list[dict]:
    """Per trained row: accuracy with both modalities and under each ablation, per seed; the §5.11 verdicts.
    With `test_limit` every score, both modalities included, is measured again on that many test questions
    ("all": the whole split), so the three are always scored on the same questions."""
    rows = []
    for r in records:
        if "error" in r:
            continue
        seeds = r.get("seeds") or [r["settings"]["seed"]]
        folders = seed_folders(r, seeds)
        row = {"label": r["label"], "lr": r["settings"].get("lr"), "seeds": seeds}
        for a in (None, *ABLATIONS) if test_limit else ABLATIONS:
            print(f"  {r['label']}: {'--ablate ' + a if a else 'both modalities'}", file=sys.stderr, flush=True)
            scores = [evaluate_run(f, r["settings"]["model"], a, test_limit) for f in folders]
            row[a or "both"] = [acc for acc, _ in scores]
            row["test_questions"] = scores[0][1]
        if not test_limit:
            row["both"] = r.get("accuracy_per_seed") or [r["accuracy"]]
        # The same seeded subset eval scored: a limit of the count it scored (the whole split when it was all).
        row["question_only_range"] = question_only_range(template, seeds[0], row["test_questions"])
        rows.append(verdict(row, chance))
    return rows


def verdict(row: dict, chance: float) -> dict:
    """§5.11 on one control row: both modalities beat the better control by MARGIN, and each control is within
    NEAR_CHANCE of chance (bounds inclusive: 235 of 500 questions is 3 points off, in floating point a hair more)."""
    worst_control = max(mean_ci(row[a])[0] for a in ABLATIONS)
    row["beats_controls_by"] = mean_ci(row["both"])[0] - worst_control
    row["passes"] = bool(row["beats_controls_by"] >= MARGIN - 1e-9 and
                         all(abs(mean_ci(row[a])[0] - chance) <= NEAR_CHANCE + 1e-9 for a in ABLATIONS))
    return row


def seed_folders(record: dict, seeds: list[int]) -> list[Path]:
    """Each seed's run folder of one compare row (compare's layout: <out>/<run_name>[/seed-N]; the record's
    settings are its first seed's)."""
    out = Path(record["settings"]["out"])
    return [out.parent / f"seed-{s}" for s in seeds] if len(seeds) > 1 else [out]


def controls_table(rows: list[dict], chance: float) -> str:
    head = ("| method | lr | test questions | both modalities | image blanked | question emptied "
            "| margin over the better control "
            f"| §5.11 (≥ {MARGIN * 100:.0f} pts; controls {chance:.2f} ± {NEAR_CHANCE:.2f}) "
            "| a question-only rule scores |\n" + "|---" * 9 + "|")
    body = []
    for r in rows:
        low, high = r.get("question_only_range") or (None, None)
        reach = "" if low is None else f"{low:.3f}" if low == high else f"{low:.3f}–{high:.3f}"
        body.append(f"| {r['label']} | {r.get('lr') or 'default'} | {r.get('test_questions', '')} | {fmt(r['both'])} "
                    f"| {fmt(r['image'])} | {fmt(r['question'])} | {r['beats_controls_by'] * 100:+.1f} pts "
                    f"| {'yes' if r['passes'] else 'no'} | {reach} |")
    return "\n".join([head, *body])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--template", default="B1", choices=TEMPLATES)
    parser.add_argument("--methods", default="full,lora,lora+gc,lst,sherl")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--max-steps", default="1200")
    parser.add_argument("--train-limit", default=str(TRAIN_LIMIT))
    parser.add_argument("--test-limit", default="all", help="test questions scored: a count or all (500)")
    parser.add_argument("--image-size", default=str(IMAGE_SIZE))
    parser.add_argument("--lr", default=None, help="default: each method's own")
    parser.add_argument("--rescore", default=None, metavar="N|all",
                        help="train nothing: score every row already in the template's results again, both "
                             "modalities and the controls, on N test questions or all of them")
    args = parser.parse_args()
    name = f"vqa-digits-{args.template.lower()}"
    out = HERE / name
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    # Either modality alone scores the template's chance rate, as the generator defines it.
    chance = load_vqa_task(f"digits-vqa/{args.template}").chance[args.template]
    if args.rescore:
        if not results.exists():
            sys.exit(f"--rescore: {results.relative_to(HERE.parent)} has no rows yet; train them first")
        with open(lock_file(name), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = json.loads(results.read_text())
            old["controls"] = control_rows(old["records"], args.template, chance, args.rescore)
            old["rescore_command"] = " ".join(["benchmarks/vqa_compare.py", *sys.argv[1:]])
            write(old, out)
        return
    # One run folder per invocation, so that invocations may run side by side.
    runs = Path("runs/bench") / name / (args.methods.replace(",", "_") + (f"-lr-{args.lr}" if args.lr else ""))
    seeds = [int(s) for s in args.seeds.split(",")]
    command = [sys.executable, "-m", "memtune", "compare", "--model", MODEL,
               "--task", f"digits-vqa/{args.template}", "--image-size", args.image_size,
               "--max-length", str(MAX_LENGTH), "--batch-size", str(BATCH_SIZE), "--train-limit", args.train_limit,
               "--max-steps", args.max_steps,
               "--methods", args.methods, "--out", str(runs), "--no-progress"]
    command += ["--seeds", args.seeds] if len(seeds) > 1 else ["--seed", args.seeds]
    command += ["--lr", args.lr] if args.lr else []
    command += ["--test-limit", args.test_limit] if args.test_limit != "all" else []
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    new = json.loads((runs / "results.json").read_text())
    new["chance"] = chance
    new["controls"] = control_rows(new["records"], args.template, chance)
    with open(lock_file(name), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # parallel invocations join their rows one at a time
        join_and_write(new, results, out)


def lock_file(name: str) -> Path:
    """The lock that serialises invocations writing one template's results (kept out of benchmarks/)."""
    path = Path("runs/bench") / name / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def join_and_write(new: dict, results: Path, out: Path) -> None:
    if results.exists():                      # join with the rows of earlier runs (same label: the new one)
        old = json.loads(results.read_text())
        labels = {r["label"] for r in new["records"]}
        new["records"] = [r for r in old["records"] if r["label"] not in labels] + new["records"]
        new["controls"] = [c for c in old.get("controls", []) if c["label"] not in labels] + new["controls"]
        new["earlier_commands"] = old.get("earlier_commands", []) + [old["command"]]
        add_ratios(new["records"])
    write(new, out)


def write(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = (settings_line(results["records"]) + "\n\n" + markdown_table(results["records"]) +
             "\n\nSingle-modality controls (mean ± 95 % half-width over seeds):\n\n" +
             controls_table(results["controls"], results["chance"]))
    (out / "results.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()

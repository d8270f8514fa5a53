"""Accuracy at convergence: every method on the full training split, several seeds, a 95 % interval.

    python benchmarks/convergence.py --task minilm                  # MiniLM + Rotten Tomatoes, every method
    python benchmarks/convergence.py --task minilm --methods lst,full --seeds 0,1,2
    python benchmarks/convergence.py --task dinov2 --methods lst:r=4     # options after the name, as in compare

Each method runs as its own `memtune compare --seeds ...` (a fresh process per seed) into
runs/convergence/<task>/<method>/, and its results.json is copied to benchmarks/convergence/<task>/<method>.json
as soon as it finishes, so an interrupted benchmark keeps what it measured; `--collect` turns the seeds an
interrupted method did finish (their metrics.json) into its record, marked `partial`. `--lr-grid` adds a learning-rate
grid per method (multiples of the method's default learning rate, chosen on a validation split carved from the
training data, see memtune.sweep). `--add-seeds 3,4` runs further seeds of methods that have a record and joins
them into it (memtune.sweep.merge_seed_runs). `--epochs 10 --select-best` trains longer and tests the epoch with the
best validation score (the LST / SHERL / QST recipes: memtune train --select-best, on a 10 % carve-out); such a
record is named after its recipe (lst_ep-10_best.json; a grid's: lst_lr-grid.json).
`python benchmarks/make_results.py` tabulates the finished methods.

Side methods and the linear probe replay the frozen trunk from epoch 2 on (`cache_trunk=true`); LST, SHERL, QST and the
probe then run the trunk in eval mode (`trunk_dropout=false`), which the cache needs on a backbone with dropout.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHED = {"lst": "lst:cache_trunk=true:trunk_dropout=false",
          "sherl": "sherl:cache_trunk=true:trunk_dropout=false",
          "qst": "qst:cache_trunk=true:trunk_dropout=false",
          "dtl": "dtl:cache_trunk=true",
          # The probe's cache holds one pooled feature row per example (768 values on DINOv2-S): full precision.
          "linear": "linear:cache_trunk=true:trunk_dropout=false"}
TASKS = {
    # The full Rotten Tomatoes training split (10,174 snippets), 2 epochs at the README's batch 16 × 64,
    # scored on the whole test split (2,578); memory of one step at batch 32 × 128 as in the README table.
    "minilm-rotten-tomatoes": {
        "flags": ["--model", "minilm", "--task", "rotten-tomatoes", "--batch-size", "16", "--max-length", "64",
                  "--epochs", "2", "--memory-batch-size", "32", "--memory-max-length", "128"],
        "methods": ["lst", "full", "lora+gc", "sherl", "qst", "meft2", "dtl", "linear"], "family": "bert",
    },
    # DINOv2-S on 5,000 Fashion-MNIST training images at 112 px, scored on 5,000 test images.
    "dinov2s-fashion-mnist": {
        "flags": ["--model", "dinov2-s", "--task", "fashion-mnist", "--image-size", "112", "--batch-size", "16",
                  "--train-limit", "5000", "--test-limit", "5000", "--epochs", "3"],
        "methods": ["linear", "lst", "dtl", "sherl", "qst", "full", "lora+gc", "meft1"], "family": "vit",
        # 5,000 images × 65 tokens × 13 taps × 384 × 4 bytes ≈ 6 GiB in fp32: the side networks' caches keep bf16.
        "cache_options": ":cache_dtype=bf16",
    },
}


def method_spec(name: str, task: dict | None = None) -> str:
    """The spec a method runs as: a side method gets its trunk-cache options, then the options given with it
    ('lst:r=4' → 'lst:cache_trunk=true:trunk_dropout=false[:cache_dtype=bf16]:r=4')."""
    base, sep, options = name.partition(":")
    if base not in CACHED:
        return name
    extra = (task or {}).get("cache_options", "") if base not in ("dtl", "linear") else ""
    return CACHED[base] + extra + sep + options


def record_name(name: str) -> str:
    """The record's file stem (and run folder) for a --methods item: compare's run name with '+' → '_'
    ('lora+gc' → 'lora_gc', 'lst:r=4' → 'lst_r-4')."""
    from memtune.spec import parse_specs

    return parse_specs([name])[0].run_name.replace("+", "_")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, help="minilm or dinov2 (a prefix of " + ", ".join(TASKS) + ")")
    ap.add_argument("--methods", default=None, help="comma list (default: the task's list)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--add-seeds", default=None,
                    help="seeds to add to each method's existing record: a comma list (1,2) or one seed (1)")
    ap.add_argument("--lr-grid", default=None, help="multiples of each method's default lr, e.g. 0.3,1,3")
    ap.add_argument("--epochs", type=float, default=None, help="epochs of every run (default: the task's)")
    ap.add_argument("--select-best", action="store_true",
                    help="hold out 10 %% of the training data and test each run's best validation epoch")
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: record the finished seeds of methods whose compare was interrupted")
    a = ap.parse_args()
    if a.add_seeds and a.lr_grid:
        ap.error("--add-seeds trains at the learning rate of the record it extends; leave out --lr-grid")
    name = next((t for t in TASKS if t.startswith(a.task)), None)
    if name is None:
        ap.error(f"--task: {a.task!r} is not one of {', '.join(TASKS)}")
    task = TASKS[name]
    recipe = recipe_flags(a.epochs, a.select_best)
    dest = HERE / "convergence" / name
    dest.mkdir(parents=True, exist_ok=True)
    from memtune.spec import split_specs

    for m in (split_specs(a.methods) if a.methods else task["methods"]):
        stem = record_name(m) + recipe_suffix(a.epochs, a.select_best, bool(a.lr_grid))
        out = Path("runs/convergence") / name / stem
        record_file = dest / f"{stem}.json"
        if a.collect:
            record = partial_record(out, method_spec(m, task))
            if record and not (out / "results.json").exists():
                record_file.write_text(json.dumps({"records": [record]}, indent=1) + "\n")
                print(f"{m}: seeds {record['seeds']} of an interrupted run", flush=True)
            continue
        cmd = [sys.executable, "-m", "memtune", "compare", *task["flags"], *recipe, "--methods", method_spec(m, task),
               "--no-progress", *seed_flags(a.add_seeds or a.seeds, count_allowed=not a.add_seeds)]
        if a.add_seeds:
            if not record_file.exists():
                sys.exit(f"--add-seeds: {m} has no record {record_file.name} to extend; run it with --seeds first")
            out = out.with_name(out.name + "-more-seeds")
            cmd += same_recipe_flags(record_file)
        cmd += ["--out", str(out)]
        if a.lr_grid:
            cmd += ["--lr-grid", ",".join(f"{float(x) * default_lr(m, task):g}" for x in a.lr_grid.split(","))]
        print("$", " ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd).returncode != 0 or not (out / "results.json").exists():
            continue
        if a.add_seeds:
            extend_record(record_file, out / "results.json")
        else:
            shutil.copy(out / "results.json", record_file)


def recipe_flags(epochs: float | None, select_best: bool) -> list[str]:
    """compare flags of a recipe beyond the task's (they come after the task's flags, so they win)."""
    flags = ["--epochs", f"{epochs:g}"] if epochs else []
    return flags + (["--val-fraction", "0.1", "--select-best"] if select_best else [])


def recipe_suffix(epochs: float | None, select_best: bool, lr_grid: bool = False) -> str:
    """The record name's recipe part: '_ep-10_best' for --epochs 10 --select-best, '_lr-grid' for a learning-rate
    grid, '' for the task's recipe (so a grid never overwrites the default learning rate's record)."""
    return (f"_ep-{epochs:g}" if epochs else "") + ("_best" if select_best else "") + ("_lr-grid" if lr_grid else "")


def seed_flags(seeds: str, count_allowed: bool) -> list[str]:
    """compare's seed flags: '0,1,2' as given; one number is a count for --seeds, a seed for --add-seeds
    ('2' → --seeds 1 --seed 2)."""
    if "," in seeds or count_allowed:
        return ["--seeds", seeds]
    return ["--seeds", "1", "--seed", seeds.strip()]


def same_recipe_flags(record_file: Path) -> list[str]:
    """The settings a record's seeds trained with beyond the task's flags: the learning rate (a grid's pick) and
    the validation carve-out (every seed of a grid trains without the held-out share)."""
    [record] = json.loads(record_file.read_text())["records"]
    settings, flags = record["settings"], []
    lr = record.get("lr_selected") or settings.get("lr")
    if lr:
        flags += ["--lr", f"{lr:g}"]
    if settings.get("val_fraction"):
        flags += ["--val-fraction", f"{settings['val_fraction']:g}"]
    if settings.get("select_best"):
        flags += ["--select-best"]
    return flags + ["--epochs", f"{settings['epochs']:g}"]


def extend_record(record_file: Path, more_file: Path) -> None:
    """Join the seeds of a later run (more_file) into a method's record; the file keeps both commands."""
    from memtune.sweep import merge_seed_runs

    base, more = json.loads(record_file.read_text()), json.loads(more_file.read_text())
    [old], [new] = base["records"], more["records"]
    if "error" in new:
        print(f"{record_file.stem}: the added seeds failed ({new['error'][:200]}); the record is unchanged")
        return
    base["records"] = [merge_seed_runs(old, new)]
    base["earlier_commands"] = [*base.get("earlier_commands", []), base["command"]]
    base["command"] = more["command"]
    record_file.write_text(json.dumps(base, indent=1) + "\n")


def partial_record(out: Path, label: str) -> dict | None:
    """The record `memtune compare --seeds` would have written, from the seeds that finished (seed-N/metrics.json
    under the method's row folder); None when no seed finished."""
    from memtune.sweep import ci95_half_width

    runs = sorted(out.glob("*/seed-*/metrics.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    if not runs:
        return None
    seeds = [json.loads(p.read_text()) for p in runs]
    first, accs = seeds[0], [r["accuracy"] for r in seeds]
    settings = {**first["settings"], "seeds": [r["settings"]["seed"] for r in seeds]}
    return {**{k: first[k] for k in ("method", "config", "peak_bytes", "activation_peak_bytes", "steps",
                                      "wall_time_s", "trainable_pct", "train_examples", "test_examples")},
            "label": label,
            "techniques": first.get("techniques", []), "settings": settings, "seeds": settings["seeds"],
            "accuracy_per_seed": accs, "accuracy_mean": sum(accs) / len(accs),
            "accuracy_ci95": ci95_half_width(accs), "partial": True,
            **({"best_epoch_per_seed": [r["selection"]["best_epoch"] for r in seeds]}
               if all("selection" in r for r in seeds) else {})}


def default_lr(spec: str, task: dict) -> float:
    """The learning rate the method uses when none is given, on the task's model family."""
    from memtune.methods import METHODS

    return METHODS[spec.split(":")[0].split("+")[0]].lr_for(task["family"])


if __name__ == "__main__":
    main()

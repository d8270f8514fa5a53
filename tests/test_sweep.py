"""Seeds, learning-rate grids and the validation split (selection never sees the test split)."""
import math

import pytest

from memtune.data import load_task
from memtune.data.base import TaskError
from memtune.data.splits import carve_validation
from memtune.sweep import aggregate, ci95_half_width, merge_seed_runs, parse_lr_grid, parse_seeds, run_spec, select_lr
from memtune.train import ArgumentError


def test_ci95_matches_the_t_interval():
    # n = 3, stdev = 0.01, t(0.975, 2) = 4.3027: half-width = 4.3027 * 0.01 / sqrt(3)
    assert ci95_half_width([0.79, 0.80, 0.81]) == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    assert ci95_half_width([0.8]) is None


def test_parsers_accept_counts_lists_and_refuse_nonsense():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,5,7") == [0, 5, 7]
    assert parse_seeds(None, 4) == [4]
    assert parse_lr_grid("1e-3,1e-4") == [1e-4, 1e-3]
    for bad in ("0", "-1", "a", "1,1"):
        with pytest.raises(ArgumentError):
            parse_seeds(bad)
    with pytest.raises(ArgumentError, match="count of seeds.*give --seeds 1 --seed 0"):
        parse_seeds("0")                     # one seed 0: a count of zero, with the spelling that works
    for bad in ("x", "0", "-1e-3", "1e-3,1e-3", "inf"):
        with pytest.raises(ArgumentError):
            parse_lr_grid(bad)


def test_selection_uses_validation_only_and_prefers_the_smaller_lr_on_ties():
    trials = {1e-4: {"val_accuracy": 0.7, "accuracy": 0.99}, 3e-4: {"val_accuracy": 0.8, "accuracy": 0.1},
              1e-3: {"val_accuracy": 0.8, "accuracy": 0.5}, 3e-3: {"error": "nan loss"}}
    assert select_lr(trials) == 3e-4


def test_run_spec_reuses_the_first_seed_and_aggregates():
    calls = []

    def run_one(seed, lr, validate):
        calls.append((seed, lr, validate))
        return {"accuracy": 0.7 + 0.01 * seed + (0.1 if lr == 1e-3 else 0), "step_time_s": 1.0,
                "val_accuracy": 0.5 + (0.2 if lr == 1e-3 else 0)}

    rec = run_spec(run_one, [0, 1, 2], [1e-4, 1e-3])
    assert calls == [(0, 1e-4, True), (0, 1e-3, True), (1, 1e-3, True), (2, 1e-3, True)]
    assert rec["lr_selected"] == 1e-3 and rec["seeds"] == [0, 1, 2]
    assert rec["accuracy_per_seed"] == pytest.approx([0.8, 0.81, 0.82])
    assert rec["accuracy_mean"] == pytest.approx(0.81)
    assert rec["accuracy_ci95"] == pytest.approx(ci95_half_width([0.8, 0.81, 0.82]))


def test_aggregate_keeps_going_when_one_seed_fails():
    rec = aggregate([{"accuracy": 0.8}, {"error": "boom"}, {"accuracy": 0.9}], [0, 1, 2])
    assert rec["seeds"] == [0, 2] and rec["failed_seeds"] == [1]
    assert rec["accuracy_mean"] == pytest.approx(0.85)


def _seed_run(seeds, accs, mcc=True, **settings):
    runs = [{"label": "lora+gc", "method": "lora", "config": {"r": 8}, "accuracy": a, "mcc": a - 0.1,
             "step_time_s": 2.0 + s, "peak_bytes": 100 + s, "settings": {"seed": s, "lr": None, **settings}}
            for s, a in zip(seeds, accs)]
    rec = aggregate(runs, seeds)
    if mcc:    # as a task whose metrics include MCC records it: per seed
        values = [r["mcc"] for r in runs]
        rec.update(mcc_per_seed=values, mcc_mean=sum(values) / len(values), mcc_ci95=ci95_half_width(values))
    return rec


def test_merged_seed_runs_equal_one_run_over_all_their_seeds():
    merged = merge_seed_runs(_seed_run([0], [0.88]), _seed_run([2, 1], [0.86, 0.87]))
    whole = _seed_run([0, 1, 2], [0.88, 0.87, 0.86])
    assert merged["seeds"] == [0, 1, 2]
    for metric in ("accuracy", "mcc"):
        assert merged[f"{metric}_per_seed"] == pytest.approx(whole[f"{metric}_per_seed"])
        assert merged[f"{metric}_mean"] == pytest.approx(whole[f"{metric}_mean"]) == merged[metric]
        assert merged[f"{metric}_ci95"] == pytest.approx(whole[f"{metric}_ci95"])
    # memory and settings stay the base run's first seed's
    assert merged["peak_bytes"] == 100 and merged["settings"]["seed"] == 0


def test_merging_drops_a_summary_that_only_one_run_has():
    merged = merge_seed_runs(_seed_run([0], [0.88]), _seed_run([1], [0.87], mcc=False))
    assert "mcc_per_seed" not in merged and "mcc_mean" not in merged
    assert merged["accuracy_per_seed"] == pytest.approx([0.88, 0.87])


def test_merging_refuses_other_specs_and_repeated_seeds():
    with pytest.raises(ArgumentError, match="settings.lr"):
        merge_seed_runs(_seed_run([0], [0.88]), _seed_run([1], [0.87], lr=1e-3))
    other = {**_seed_run([1], [0.87]), "config": {"r": 4}}
    with pytest.raises(ArgumentError, match="config"):
        merge_seed_runs(_seed_run([0], [0.88]), other)
    with pytest.raises(ArgumentError, match=r"seeds \[1\] are in both"):
        merge_seed_runs(_seed_run([0, 1], [0.88, 0.8]), _seed_run([1, 2], [0.87, 0.86]))


def test_validation_is_disjoint_from_train_and_test_and_movie_disjoint():
    task = load_task("rotten-tomatoes", train_limit=600, test_limit=100, val_fraction=0.2, seed=1)
    assert task.validation and task.train
    texts = lambda xs: {ex["text"] for ex in xs}  # noqa: E731
    assert not texts(task.validation) & texts(task.train)
    assert not texts(task.validation) & texts(task.test)
    assert not {ex["movie"] for ex in task.validation} & {ex["movie"] for ex in task.train}
    assert 0.1 < len(task.validation) / 600 < 0.3
    again = load_task("rotten-tomatoes", train_limit=600, test_limit=100, val_fraction=0.2, seed=1)
    assert texts(again.validation) == texts(task.validation)          # seeded: reproducible
    other = load_task("rotten-tomatoes", train_limit=600, test_limit=100, val_fraction=0.2, seed=2)
    assert texts(other.test) == texts(load_task("rotten-tomatoes", train_limit=600, test_limit=100, seed=2).test)


def test_stratified_validation_keeps_every_class():
    examples = [{"text": f"t{i}", "label": i % 3} for i in range(60)]
    train, val = carve_validation(examples, 0.2, seed=0)
    assert len(val) == 12 and {ex["label"] for ex in val} == {0, 1, 2}
    assert not {ex["text"] for ex in val} & {ex["text"] for ex in train}
    with pytest.raises(TaskError, match="fraction"):
        carve_validation(examples, 1.5, seed=0)


def test_compare_with_seeds_records_every_seed_and_the_interval(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "memtune", "compare", "--model", "tiny-bert", "--task", "rotten-tomatoes",
           "--methods", "lora", "--train-limit", "32", "--test-limit", "16", "--max-steps", "1", "--seeds", "2",
           "--val-fraction", "0.25", "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads((out / "results.json").read_text())["records"][0]
    assert rec["label"] == "lora" and rec["seeds"] == [0, 1]
    assert len(rec["accuracy_per_seed"]) == 2 and rec["accuracy_ci95"] is not None
    assert len(rec["val_accuracy_per_seed"]) == 2       # --val-fraction held out a validation split per seed
    assert "± " in (out / "results.md").read_text()


def test_compare_refuses_lr_and_lr_grid_together(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "memtune", "compare", "--model", "tiny-bert", "--task", "rotten-tomatoes",
           "--methods", "lora", "--lr", "1e-3", "--lr-grid", "1e-4,1e-3", "--out", str(tmp_path / "c")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "--lr-grid" in proc.stderr
    assert not (tmp_path / "c").exists()

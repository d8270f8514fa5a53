"""Several seeds and a learning-rate grid per method: selection on validation, test accuracy of the pick.

    memtune compare ... --seeds 3 --lr-grid 1e-4,3e-4,1e-3

Protocol (one method spec at a time):
1. With a learning-rate grid, every grid value trains with the first seed on the training data minus a
   validation carve-out (`--val-fraction`, default 0.1); the value with the best validation score wins
   (ties: the smaller learning rate). The score is the task's main metric (`main_metric` in the record:
   accuracy unless the task declares another, e.g. MCC for glue/cola, F1 for glue/mrpc, Pearson for
   glue/stsb). The test split plays no part in the choice.
2. Every seed then trains at the chosen value (the first seed's run is reused) and is scored on the test
   split; the record holds each seed's score, their mean and the half-width of a 95 % Student-t interval.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable

# Metrics where larger is better; a record's `main_metric` (default: accuracy) decides selection and the summary.
SCORES = ("accuracy", "val_accuracy")
# Summarised over seeds besides the task's own metrics.
_SUMMARISED = ("accuracy", "val_accuracy", "perplexity")


def main_metric(record: dict) -> str:
    """The metric that selects and summarises: the task's main metric, accuracy where none is recorded."""
    return record.get("main_metric") or "accuracy"


def ci95_half_width(values: list[float]) -> float | None:
    """Half-width of the 95 % confidence interval of the mean (Student t, n − 1 degrees of freedom)."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    return float(t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def parse_lr_grid(text: str | None) -> list[float]:
    """'1e-4,3e-4,1e-3' → [1e-4, 3e-4, 1e-3]; every value must be a positive finite float."""
    from .train import ArgumentError

    if not text:
        return []
    grid = []
    for item in text.split(","):
        try:
            lr = float(item)
        except ValueError:
            raise ArgumentError(f"--lr-grid: {item.strip()!r} is not a number; give e.g. 1e-4,3e-4,1e-3") from None
        if not (lr > 0 and math.isfinite(lr)):
            raise ArgumentError(f"--lr-grid: learning rates must be > 0, got {item.strip()}")
        grid.append(lr)
    if len(set(grid)) != len(grid):
        raise ArgumentError(f"--lr-grid lists a value twice: {text}")
    return sorted(grid)


def parse_seeds(text: str | None, base_seed: int = 0) -> list[int]:
    """'3' → three seeds from the base seed on; '0,5,7' → those seeds."""
    from .train import ArgumentError

    if text is None:
        return [base_seed]
    text = str(text).strip()
    try:
        numbers = [int(s) for s in text.split(",")]
    except ValueError:
        raise ArgumentError(f"--seeds takes a count (3) or a comma list of seeds (0,1,2), got {text!r}") from None
    if "," in text:
        seeds = numbers
    elif numbers[0] < 1:
        hint = "; for one run with seed 0 give --seeds 1 --seed 0" if numbers[0] == 0 else ""
        raise ArgumentError(f"--seeds {text}: a single number is a count of seeds (from --seed on) and must be "
                            f">= 1{hint}")
    else:
        seeds = list(range(base_seed, base_seed + numbers[0]))
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ArgumentError(f"--seeds must be distinct non-negative integers, got {text}")
    return seeds


def select_lr(trials: dict[float, dict]) -> float:
    """The grid value whose validation score (of the main metric) is highest (ties: the smaller learning rate)."""
    scored = {lr: r.get(f"val_{main_metric(r)}") for lr, r in trials.items() if "error" not in r}
    scored = {lr: s for lr, s in scored.items() if s is not None}
    if not scored:
        raise RuntimeError("no learning rate of the grid finished with a validation score")
    return min(scored, key=lambda lr: (-scored[lr], lr))


def aggregate(records: list[dict], seeds: list[int]) -> dict:
    """One record for a spec from its per-seed records: the first seed's record (memory, settings), plus
    `seeds`, `accuracy_per_seed`, `accuracy_mean` (also in `accuracy`), `accuracy_ci95` and the median step
    time over seeds (likewise for val_accuracy, perplexity and the task's metrics with their val_ forms where the
    records have them, and for the epoch --select-best tested)."""
    ok = [r for r in records if "error" not in r]
    if not ok:
        return records[0]
    out = dict(ok[0])
    out["seeds"] = [s for s, r in zip(seeds, records) if "error" not in r]
    task_metrics = ok[0].get("task_metrics") or []
    for metric in dict.fromkeys([*_SUMMARISED, *task_metrics, *(f"val_{m}" for m in task_metrics)]):
        values = [r[metric] for r in ok if r.get(metric) is not None]
        if len(values) == len(ok):
            out[f"{metric}_per_seed"] = values
            out[f"{metric}_mean"] = out[metric] = statistics.fmean(values)    # `accuracy`: the mean too
            out[f"{metric}_ci95"] = ci95_half_width(values)
    picks = [(r.get("selection") or {}).get("best_epoch") for r in ok]
    if all(p is not None for p in picks):             # --select-best: the epoch each seed tested
        out["best_epoch_per_seed"] = picks
        out["best_epoch_mean"] = out["best_epoch"] = statistics.fmean(picks)
        out["best_epoch_ci95"] = ci95_half_width(picks)
    times = [r["step_time_s"] for r in ok if r.get("step_time_s")]
    if times:
        out["step_time_s"] = statistics.median(times)
    failed = [s for s, r in zip(seeds, records) if "error" in r]
    if failed:
        out["failed_seeds"] = failed
    return out


# Settings that differ between runs of one spec on different seeds.
_PER_RUN_SETTINGS = ("seed", "seeds", "out")


def merge_seed_runs(base: dict, more: dict) -> dict:
    """One record from two aggregated runs of the same spec on disjoint seeds (a benchmark extended with more
    seeds later): the per-seed values are joined in seed order, and their mean and interval recomputed.
    Memory, step time and settings stay the base run's (its first seed's), as in `aggregate`."""
    from .train import ArgumentError

    differ = [k for k in ("label", "method", "model", "task", "config", "techniques") if base.get(k) != more.get(k)]
    settings = [k for k in {*base.get("settings", {}), *more.get("settings", {})} - set(_PER_RUN_SETTINGS)
                if base["settings"].get(k) != more["settings"].get(k)]
    if differ or settings:
        raise ArgumentError(f"these runs are not the same spec on other seeds: they differ in "
                            f"{', '.join([*differ, *(f'settings.{k}' for k in sorted(settings))])}")
    if set(base["seeds"]) & set(more["seeds"]):
        raise ArgumentError(f"seeds {sorted(set(base['seeds']) & set(more['seeds']))} are in both runs; "
                            "extend a run with seeds it does not have")
    seeds = [*base["seeds"], *more["seeds"]]
    order = sorted(range(len(seeds)), key=seeds.__getitem__)
    out = {**base, "seeds": [seeds[i] for i in order]}
    for key in [k for k in base if k.endswith("_per_seed")]:
        metric = key[:-len("_per_seed")]
        if more.get(key) is None:      # the other run lacks it: no summary over only some seeds
            for k in (key, f"{metric}_mean", f"{metric}_ci95"):
                out.pop(k, None)
            continue
        joined = [*base[key], *more[key]]
        values = [joined[i] for i in order]
        out[key] = values
        out[f"{metric}_mean"] = out[metric] = statistics.fmean(values)
        out[f"{metric}_ci95"] = ci95_half_width(values)
    return out


def run_spec(run_one: Callable[[int, float | None, bool], dict], seeds: list[int], lr_grid: list[float]) -> dict:
    """Run one method spec under the protocol above. `run_one(seed, lr, validate)` trains once and returns
    its record (`validate`: hold out the validation split and report `val_accuracy`)."""
    chosen = None
    trials: dict[float, dict] = {}
    if lr_grid:
        trials = {lr: run_one(seeds[0], lr, True) for lr in lr_grid}
        try:
            chosen = select_lr(trials)
        except RuntimeError as e:
            first = next(iter(trials.values()))
            return {**first, "error": first.get("error", str(e))}
    records = [trials[chosen] if chosen is not None and s == seeds[0] else run_one(s, chosen, bool(lr_grid))
               for s in seeds]
    out = aggregate(records, seeds)
    if lr_grid:
        out["lr_grid"] = {f"{lr:g}": trials[lr].get(f"val_{main_metric(trials[lr])}") for lr in lr_grid}
        out["lr_selected"] = chosen
    return out

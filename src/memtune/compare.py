"""Side-by-side comparison: each method trains in its own fresh process under identical settings.

    memtune compare --model minilm --task rotten-tomatoes --methods full,linear,lora,lst --out runs/cmp

Writes DIR/<label>/ (each run's adapter and metrics.json), DIR/results.json (one record per method),
DIR/results.md (the table), DIR/memory_vs_accuracy.png and DIR/memory_vs_time.png (peak memory against
step time, accuracy as colour, the Pareto front drawn). Rows are `memtune.spec` specs: a method, its
options and memory techniques (`lora:r=16+nf4+gc`); the records carry the label as given. A method that fails (out of memory, NaN,
unsupported family) gets a row with its error; the others still run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .atomic import write_json, write_text
from .metrics import NAMES
from .plots import plot_memory_vs_accuracy, plot_memory_vs_time
from .run_info import git_commit, machine, versions
from .spec import parse_specs
from .sweep import run_spec
from .techniques import MemoryTechniques

GIB = 2**30


def child_command(spec, out: Path, train_flags: list[str]) -> list[str]:
    """The `memtune train` command of one row: its method, options and technique flags."""
    # --overwrite: a rerun of the comparison replaces each row's earlier run folder.
    cmd = [sys.executable, "-m", "memtune", "train", "--method", spec.method, "--out", str(out), "--measure-memory",
           "--overwrite", *train_flags]
    for k, v in spec.options.items():
        cmd += [f"--{k.replace('_', '-')}", v]
    t = MemoryTechniques.from_names(spec.techniques)
    if t.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    if t.quantize:
        cmd += ["--quantize", t.quantize]
    if t.offload_activations:
        cmd.append("--offload-activations")
    if t.chunked_ce:
        cmd.append("--chunked-ce")
    return cmd


def run_compare(specs: list[str], train_flags: list[str], out_dir, json_path=None, progress=True,
                seeds: list[int] | None = None, lr_grid: list[float] | None = None,
                val_fraction: float = 0.1) -> list[dict]:
    """Train every spec (several seeds and a learning-rate grid: see `memtune.sweep`) and tabulate."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parsed = parse_specs(specs)
    records = []
    for i, spec in enumerate(parsed, 1):
        print(f"[{i}/{len(parsed)}] {spec.label}", file=sys.stderr, flush=True)
        if not seeds and not lr_grid:
            records.append(_run_row(spec, out_dir / spec.run_name, train_flags, progress))
            continue

        def run_one(seed, lr, validate, spec=spec):
            name = f"{spec.run_name}/seed-{seed}" + (f"-lr-{lr:g}" if lr is not None else "")
            extra = ["--seed", str(seed)] + (["--lr", repr(lr)] if lr is not None else [])
            extra += ["--val-fraction", str(val_fraction)] if validate else []
            return _run_row(spec, out_dir / name, train_flags + extra, progress)

        records.append({**run_spec(run_one, seeds or [0], lr_grid or []), "label": spec.label})
    add_ratios(records)
    summary = {"records": records, "versions": versions(), "git_commit": git_commit(), "machine": machine(),
               "command": "memtune compare " + " ".join(sys.argv[2:])}
    write_json(out_dir / "results.json", summary)
    if json_path:
        write_json(json_path, summary)
    table = settings_line(records) + "\n\n" + markdown_table(records)
    write_text(out_dir / "results.md", table + "\n")
    plot_memory_vs_accuracy(records, out_dir / "memory_vs_accuracy.png")
    plot_memory_vs_time(records, out_dir / "memory_vs_time.png")
    print(table)
    print(f"\ntable: {out_dir / 'results.md'}\njson:  {json_path or out_dir / 'results.json'}\n"
          f"plots: {out_dir / 'memory_vs_accuracy.png'}, {out_dir / 'memory_vs_time.png'}")
    return records


def _run_row(spec, run_dir: Path, train_flags: list[str], progress: bool) -> dict:
    """One `memtune train` child process; its metrics.json as a record, or a record with its error."""
    cmd = child_command(spec, run_dir, train_flags + ([] if progress else ["--no-progress"]))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics_file = run_dir / "metrics.json"
    if proc.returncode == 0 and metrics_file.exists():
        rec = json.loads(metrics_file.read_text())
        rec.pop("machine", None)
        return {**rec, "label": spec.label, "techniques": list(spec.techniques)}
    err = _last_error(proc)
    print(f"    {spec.label} failed: {err}", file=sys.stderr)
    return {"label": spec.label, "method": spec.method, "techniques": list(spec.techniques), "error": err,
            "returncode": proc.returncode}


def _last_error(proc) -> str:
    text = (proc.stderr or "") + (proc.stdout or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("memtune: error:"):
            return ln.removeprefix("memtune: error:").strip()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def add_ratios(records: list[dict]) -> None:
    """Ratios to full fine-tuning measured in the same run (None where full is absent or failed)."""
    done = [r for r in records if r.get("method") == "full" and "error" not in r]
    full = next((r for r in done if not r.get("techniques")), done[0] if done else None)   # plain full first
    for r in records:
        for key, ratio in (("peak_bytes", "peak_ratio_vs_full"), ("activation_peak_bytes", "activation_ratio_vs_full"),
                           ("step_time_s", "step_time_ratio_vs_full")):
            r[ratio] = (r[key] / full[key]) if full and r.get(key) is not None and full.get(key) else None


def memory_shape(settings: dict) -> str:
    b = settings.get("memory_batch_size") or settings["batch_size"]
    n = settings.get("memory_max_length") or settings["max_length"]
    return f"batch {b} × {n}"


def settings_line(records: list[dict]) -> str:
    ok = next((r for r in records if "settings" in r), None)
    if ok is None:
        return "(every method failed)"
    s = ok["settings"]
    steps = f"{ok['steps']} steps" if ok.get("steps") else ""
    return (f"{s['model']} on {s['task']}; training: batch {s['batch_size']} × {s['max_length']}, {steps}, "
            f"{ok['train_examples']} train / {ok['test_examples']} test examples, {s['precision']}, seed {s['seed']}; "
            f"memory: one step at {memory_shape(s)} (padded), AdamW; device: "
            f"{ok.get('memory', {}).get('device', '?')}")


def _fmt_time(x):
    return "–" if x is None else f"{x:.3f}"


def _fmt_ratio(x):
    return "" if x is None else f" ({x:.2f}×)"


def _metric_text(r: dict, metric: str) -> str | None:
    """One metric of a record: the mean ± 95 % half-width over seeds where there are several, else the value."""
    if r.get(f"{metric}_ci95") is not None:
        return f"{r[f'{metric}_mean']:.3f} ± {r[f'{metric}_ci95']:.3f} ({len(r['seeds'])} seeds)"
    return None if r.get(metric) is None else f"{r[metric]:.3f}"


def _score(r: dict) -> str:
    """The task's metrics, main first (accuracy alone for tasks that declare nothing else), or perplexity."""
    if r.get("accuracy") is None and r.get("perplexity") is not None:
        text = _metric_text(r, "perplexity")
        text = f"ppl {text}"
    else:
        metrics = r.get("task_metrics") or ["accuracy"]
        parts = [(m, _metric_text(r, m)) for m in metrics]
        parts = [(m, t) for m, t in parts if t is not None]
        if not parts:
            return "–"
        text = "; ".join(t if metrics == ["accuracy"] else f"{NAMES.get(m, m)} {t}" for m, t in parts)
    return text + (f", lr {r['lr_selected']:g}" if r.get("lr_selected") is not None else "")


def score_header(records: list[dict]) -> str:
    """"accuracy" where every row reports accuracy alone (as before per-task metrics), else the main metric
    of the task(s) first, then the others."""
    declared = {tuple(r.get("task_metrics") or ["accuracy"]) for r in records if "error" not in r}
    if declared <= {("accuracy",)}:
        return "accuracy"
    if len(declared) == 1:
        return ", ".join(NAMES.get(m, m) for m in next(iter(declared)))
    return "metrics (main first)"


def markdown_table(records: list[dict]) -> str:
    rows = ["| method | trainable params | peak GiB (vs full) | activation peak GiB (vs full) | "
            f"s/step (vs full) | {score_header(records)} |", "|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['label']} | failed: {r['error'][:120]} | | | | |")
            continue
        score = _score(r)
        rows.append(
            f"| {r['label']} | {r['trainable_params']:,} ({r['trainable_pct']:.2f} %) | "
            f"{r['peak_bytes'] / GIB:.3f}{_fmt_ratio(r['peak_ratio_vs_full'])} | "
            f"{r['activation_peak_bytes'] / GIB:.3f}{_fmt_ratio(r['activation_ratio_vs_full'])} | "
            f"{_fmt_time(r.get('step_time_s'))}{_fmt_ratio(r['step_time_ratio_vs_full'])} | {score} |")
    return "\n".join(rows)

"""Side-by-side comparison: each method trains in its own fresh process under identical settings.

    memtune compare --model minilm --task rotten-tomatoes --methods full,linear,lora,lst --out runs/cmp

Writes DIR/<label>/ (each run's adapter and metrics.json), DIR/results.json (one record per method),
DIR/results.md (the table) and DIR/memory_vs_accuracy.png. A method that fails (out of memory, NaN,
unsupported family) gets a row with its error; the others still run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .atomic import write_json, write_text
from .run_info import git_commit, machine, versions

GIB = 2**30


def parse_method_spec(spec: str) -> tuple[str, str, dict]:
    """'sherl:late_layers=2' → (label, method, options). Options are `key=value`, ':'-separated."""
    method, *opts = spec.strip().split(":")
    options = {}
    for o in opts:
        if "=" not in o:
            raise ValueError(f"method spec {spec!r}: options must be key=value (e.g. sherl:late_layers=2)")
        k, v = o.split("=", 1)
        options[k.strip()] = v.strip()
    return spec.strip(), method, options


def child_command(method: str, options: dict, out: Path, train_flags: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "memtune", "train", "--method", method, "--out", str(out), "--measure-memory",
           *train_flags]
    for k, v in options.items():
        cmd += [f"--{k.replace('_', '-')}", v]
    return cmd


def run_compare(specs: list[str], train_flags: list[str], out_dir, json_path=None, progress=True) -> list[dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parsed = [parse_method_spec(s) for s in specs]
    records = []
    for i, (label, method, options) in enumerate(parsed, 1):
        run_dir = out_dir / label.replace(":", "_").replace("=", "-")
        print(f"[{i}/{len(parsed)}] {label}", file=sys.stderr, flush=True)
        cmd = child_command(method, options, run_dir, train_flags + ([] if progress else ["--no-progress"]))
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        metrics_file = run_dir / "metrics.json"
        if proc.returncode == 0 and metrics_file.exists():
            rec = json.loads(metrics_file.read_text())
            rec["label"] = label
            rec.pop("machine", None)
        else:
            err = _last_error(proc)
            print(f"    {label} failed: {err}", file=sys.stderr)
            rec = {"label": label, "method": method, "error": err, "returncode": proc.returncode}
        records.append(rec)
    add_ratios(records)
    summary = {"records": records, "versions": versions(), "git_commit": git_commit(), "machine": machine(),
               "command": "memtune compare " + " ".join(sys.argv[2:])}
    write_json(out_dir / "results.json", summary)
    if json_path:
        write_json(json_path, summary)
    table = settings_line(records) + "\n\n" + markdown_table(records)
    write_text(out_dir / "results.md", table + "\n")
    plot_memory_vs_accuracy(records, out_dir / "memory_vs_accuracy.png")
    print(table)
    print(f"\ntable: {out_dir / 'results.md'}\njson:  {json_path or out_dir / 'results.json'}\n"
          f"plot:  {out_dir / 'memory_vs_accuracy.png'}")
    return records


def _last_error(proc) -> str:
    text = (proc.stderr or "") + (proc.stdout or "")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("memtune: error:"):
            return ln.removeprefix("memtune: error:").strip()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def add_ratios(records: list[dict]) -> None:
    """Ratios to full fine-tuning measured in the same run (None where full is absent or failed)."""
    full = next((r for r in records if r.get("method") == "full" and "error" not in r), None)
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


def _fmt_ratio(x):
    return "" if x is None else f" ({x:.2f}×)"


def markdown_table(records: list[dict]) -> str:
    rows = ["| method | trainable params | peak GiB (vs full) | activation peak GiB (vs full) | "
            "s/step (vs full) | accuracy |", "|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['label']} | failed: {r['error'][:120]} | | | | |")
            continue
        score = r.get("accuracy")
        score = f"{score:.3f}" if score is not None else f"ppl {r.get('perplexity', float('nan')):.2f}"
        rows.append(
            f"| {r['label']} | {r['trainable_params']:,} ({r['trainable_pct']:.2f} %) | "
            f"{r['peak_bytes'] / GIB:.3f}{_fmt_ratio(r['peak_ratio_vs_full'])} | "
            f"{r['activation_peak_bytes'] / GIB:.3f}{_fmt_ratio(r['activation_ratio_vs_full'])} | "
            f"{r['step_time_s']:.3f}{_fmt_ratio(r['step_time_ratio_vs_full'])} | {score} |")
    return "\n".join(rows)


def plot_memory_vs_accuracy(records: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "error" not in r and r.get("accuracy") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in ok:
        x, y = r["peak_bytes"] / GIB, 100 * r["accuracy"]
        ax.scatter(x, y, s=40)
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("peak training memory (GiB)")
    ax.set_ylabel("test accuracy (%)")
    if ok:
        s = ok[0]["settings"]
        ax.set_title(f"{s['model']} on {s['task']}; memory of one step at {memory_shape(s)}, {s['precision']}",
                     fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

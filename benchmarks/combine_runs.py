"""Combine finished rows of `memtune compare` runs made with identical settings into one table.

    python benchmarks/combine_runs.py OUT_DIR RUN_DIR [RUN_DIR ...] [--order full,lora,...]

A comparison that had to stop part-way (its time budget ran out) keeps every finished row in
`RUN_DIR/<row>/metrics.json`; a second `memtune compare` with the same flags runs the rest. This reads every
row's metrics.json, refuses rows whose training or memory settings differ, and writes OUT_DIR/results.json,
results.md and both plots exactly as `memtune compare` does (ratios to the full row of the combined set).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from memtune.atomic import write_json, write_text
from memtune.compare import add_ratios, markdown_table, settings_line
from memtune.plots import plot_memory_vs_accuracy, plot_memory_vs_time
from memtune.run_info import git_commit, machine, versions
from memtune.spec import parse_specs, split_specs
from memtune.train import TrainArgs

# Settings that may differ between rows of one table (the row's own method, options and techniques).
PER_ROW = {"method", "options", "out", "gradient_checkpointing", "quantize", "offload_activations", "overwrite"}


def rows_of(run_dir: Path, label_of: dict) -> list[dict]:
    recs = []
    for metrics in sorted(run_dir.glob("*/metrics.json")):
        rec = json.loads(metrics.read_text())
        rec.pop("machine", None)
        spec = label_of.get(metrics.parent.name)
        if spec is None:
            continue
        recs.append({**rec, "label": spec.label, "techniques": list(spec.techniques)})
    return recs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--order", required=True, help="the rows, comma-separated, in table order (method specs)")
    ap.add_argument("--git-commit", default=None, help="the code the rows ran, where their records name none")
    ap.add_argument("--times", default=None,
                    help="a benchmarks/plan_time_vs_cpu.py JSON: its measured step times replace the rows' wall times "
                         "(taken while other jobs shared the cores); rows it did not measure get none")
    ns = ap.parse_args(argv)
    specs = parse_specs(split_specs(ns.order))
    label_of = {s.run_name: s for s in specs}
    found = {r["label"]: r for d in ns.runs for r in rows_of(Path(d), label_of)}
    records = [found[s.label] for s in specs if s.label in found]
    missing = [s.label for s in specs if s.label not in found]
    # A setting added after a row ran is missing from its record: it ran at that setting's default.
    defaults = {f.name: f.default for f in dataclasses.fields(TrainArgs)}
    keys = {k for r in records for k in r["settings"]} - PER_ROW
    shared = [{k: r["settings"].get(k, defaults.get(k)) for k in sorted(keys)} for r in records]
    if any(s != shared[0] for s in shared):
        print("combine_runs: the rows were trained with different settings; refusing to put them in one table",
              file=sys.stderr)
        return 2
    time_source = "wall time of the training steps"
    if ns.times:
        d = json.loads(Path(ns.times).read_text())
        measured = {r["row"]: r["measured_step_time_s"] for r in d["rows"] if "measured_step_time_s" in r}
        w = d["workload"]
        time_source = (f"CPU time of one thread, batch {w['batch_size']} × {w['max_length']}, {w['attn']} attention "
                       f"({Path(ns.times).name})")
        for r, spec in zip(records, [s for s in specs if s.label in found]):
            r["train_step_time_s"] = r.get("step_time_s")
            r["step_time_s"] = measured.get(r["label"])
            if r["step_time_s"] is None and set(spec.options) == {"tap_storage"} and not spec.techniques:
                # Tap storage changes what is saved, not the FLOPs: the bare method's time serves (noted).
                r["step_time_s"] = measured.get(spec.method)
                r["step_time_borrowed_from"] = spec.method if r["step_time_s"] is not None else None
    add_ratios(records)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in shared[0].items()
                     if v is not None and k in ("model", "task", "batch_size", "max_length", "train_limit", "test_limit",
                                                "epochs", "memory_batch_size", "memory_max_length"))
    summary = {"records": records, "versions": versions(), "git_commit": records[0].get("git_commit") or ns.git_commit or git_commit(),
               "machine": machine(), "missing_rows": missing, "step_time_source": time_source,
               "command": f"memtune compare {flags} --methods {ns.order} (rows from {len(ns.runs)} runs)"}
    write_json(out / "results.json", summary)
    write_text(out / "results.md", settings_line(records) + "\n\n" + markdown_table(records) + "\n")
    plot_memory_vs_accuracy(records, out / "memory_vs_accuracy.png")
    plot_memory_vs_time(records, out / "memory_vs_time.png")
    print(markdown_table(records))
    if missing:
        print(f"not run: {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The LST paper's GLUE protocol on T5, text-to-text (docs/methods/lst.md §11), run through `memtune train`.

    python benchmarks/glue_t5.py --model t5-base --data-dir ~/glue --tasks rte,mrpc,cola --seeds 0,1,2
    python benchmarks/glue_t5.py --smoke      # this machine: tiny-t5 on a small generated GLUE-format folder

Each task × method × seed is `memtune train --objective seq2seq`: the label words are GLUE's class names
(entailment / not_entailment, ...), as T5 generates them; the loss runs through the frozen, tied LM head and
the test metric is that of the generated words (an output that is no label word is wrong), with constrained
scoring's accuracy next to it. The paper's settings: batch 100, source length 128, 20 epochs for RTE, CoLA and
MRPC and 10 for the rest, 500 warm-up steps of a linear schedule, no weight decay, clip 1.0, fp32; LST with
r = 8, the T5-base layers {1,2,3,5,6,7,9,10,11} and Fisher initialisation at lr 3e-3; full fine-tuning and
adapters at 3e-4; LoRA r = 32 at 3e-4. Beside each method, the planned peak of one training step at those
shapes (`memtune plan --objective seq2seq --target-length L`, L = the longest label in tokens + EOS).

Where this differs from the paper: it tests the last epoch on GLUE's validation split (the paper splits
the validation set of small tasks into validation and test halves and tests the best validation
checkpoint); STS-B is left out (memtune's seq2seq objective is for classes; train it with
`--objective regression`); the inputs are the tokenizer's sentence pair, not T5's "rte sentence1: ..."
prompt. memtune does not download weights or data: give a local T5 folder (or a hub id already in the
cache) and your GLUE copy (docs/data.md).

--smoke writes sst2 (240 Rotten Tomatoes reviews), rte and mrpc folders (240 generated sentence pairs whose
label the pair decides; 120 of each for validation) to a temporary GLUE copy and trains a random tiny-t5 on
them with the paper's epochs at batch 16: it checks that the protocol runs end to end here, not the paper's
accuracy.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LONG = {"rte", "cola", "mrpc"}                      # 20 epochs in the paper; the rest 10
METHODS = {                                         # method spec, learning rate (the paper's scripts)
    "full": ("full", 3e-4),
    "adapter": ("adapter", 3e-4),
    "lora": ("lora:r=32", 3e-4),
    "lst": ("lst:r=8:keep_layers=1,2,3,5,6,7,9,10,11:init=fisher", 3e-3),
}
# --smoke: tiny-t5 from random weights needs larger learning rates; Fisher on the 240 training examples.
SMOKE_METHODS = {"full": ("full", 3e-3), "lora": ("lora", 1e-2), "lst": ("lst:init=fisher:fisher_samples=240", 1e-2)}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="t5-base", help="a local T5 folder or a cached hub id")
    p.add_argument("--data-dir", default=None, help="your GLUE copy (docs/data.md)")
    p.add_argument("--tasks", default="rte,mrpc,cola,sst2,qnli,mnli,qqp")
    p.add_argument("--methods", default="full,adapter,lora,lst")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default=str(HERE / "glue_t5.json"))
    p.add_argument("--smoke", action="store_true", help="tiny-t5 on a generated GLUE-format copy (this machine)")
    return p.parse_args(argv)


# -- the generated GLUE copy of --smoke ----------------------------------------------------------------------
def _write(path: Path, header: list[str], rows: list[list]) -> None:
    """A GLUE .tsv: tab-separated, unquoted (as GLUE's own files), tabs and newlines inside a text as spaces."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(" ".join(str(v).split()) for v in row) for row in [header, *rows]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _pairs(rng: random.Random, n: int) -> list[list]:
    """Sentence pairs whose label is whether the second sentence repeats the first's subject."""
    subjects = ["the cat", "a dog", "the bird", "my friend", "the car", "a boat", "the child", "our team"]
    rows = []
    for i in range(n):
        a, b = rng.sample(subjects, 2)
        label = i % 2
        rows.append([f"{a} sat by the door today", f"{a if label else b} was seen near the house", label])
    return rows


def write_smoke_glue(folder: Path, train: int = 240, validation: int = 120) -> Path:
    """sst2 from Rotten Tomatoes (the bundled reviews), rte and mrpc from generated pairs: a GLUE-format copy."""
    from memtune.data import load_task

    rng = random.Random(0)
    rt = load_task("rotten-tomatoes", train_limit=train, test_limit=validation)
    _write(folder / "glue" / "SST-2" / "train.tsv", ["sentence", "label"], [[e["text"], e["label"]] for e in rt.train])
    _write(folder / "glue" / "SST-2" / "dev.tsv", ["sentence", "label"], [[e["text"], e["label"]] for e in rt.test])
    for name in ("RTE", "MRPC"):
        for split, n in (("train", train), ("dev", validation)):
            _write(folder / "glue" / name / f"{split}.tsv", ["sentence1", "sentence2", "label"], _pairs(rng, n))
    return folder


# -- runs --------------------------------------------------------------------------------------------------------
def run_one(model: str, task: str, data_dir: str, method: str, spec: str, lr: float, seed: int, smoke: bool,
            out: Path) -> dict:
    from memtune.spec import parse_spec
    from memtune.train import TrainArgs, load_args_task, train

    parsed = parse_spec(spec)
    args = TrainArgs(model=model, task=f"glue/{task}", method=parsed.method, options=parsed.options,
                     out=str(out / f"{task}-{method}-{seed}"), objective="seq2seq", data_dir=data_dir, seed=seed,
                     lr=lr, batch_size=16 if smoke else 100, max_length=64 if smoke else 128,
                     epochs=20 if task in LONG else 10,
                     warmup_ratio=0.0, grad_clip=1.0, progress=False, overwrite=True)
    if not smoke:                           # the paper's 500 warm-up steps, as a share of this run's steps
        steps = args.epochs * -(-len(load_args_task(args).train) // args.batch_size)
        args.warmup_ratio = min(0.5, 500 / steps)
    m = train(args)
    keep = ("accuracy", "accuracy_scored", "invalid_generations", "f1", "mcc", "main_metric", "steps",
            "step_time_s", "trainable_params", "trainable_pct", "train_loss", "test_examples", "train_examples")
    return {"task": task, "method": method, "spec": spec, "lr": lr, "seed": seed,
            **{k: m[k] for k in keep if k in m}}


def plan_rows(model: str, methods: list[str], specs: dict, target_length: int, smoke: bool) -> dict:
    """method → planned peak bytes of one training step at the paper's shapes, text-to-text."""
    from memtune.memory.plan import PlanSettings, plan

    settings = PlanSettings(model=model, batch_size=16 if smoke else 100, max_length=64 if smoke else 128,
                            precision="fp32", optimizer="adamw", attn="eager", objective="seq2seq",
                            target_length=target_length)
    result = plan(settings, [specs[m][0] for m in methods])
    return {m: {"peak_bytes": mp.peak_bytes, "activation_peak_bytes": mp.activation_peak_bytes,
                "trainable_pct": mp.trainable_pct, "status": mp.status}
            for m, mp in zip(methods, result.methods)}


def label_length(model: str, tasks: list[str], data_dir: str) -> int:
    """Decoder positions of the longest label word of the tasks (tokens + EOS)."""
    from memtune.data import load_task
    from memtune.models import load_model
    from memtune.seq2seq import label_targets

    loaded = load_model(model)
    eos = loaded.model.config.eos_token_id
    return max(len(t) for task in tasks
               for t in label_targets(loaded.preprocessor, load_task(f"glue/{task}", data_dir=data_dir,
                                                                      train_limit=1, test_limit=1).label_names, eos))


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and 95 % interval (t, n-1) of the main metric per task × method."""
    from memtune.sweep import ci95_half_width

    out = {}
    for r in rows:
        out.setdefault((r["task"], r["method"]), []).append(r)
    table = []
    for (task, method), rs in out.items():
        metric = rs[0].get("main_metric", "accuracy")
        values = [r[metric] for r in rs]
        table.append({"task": task, "method": method, "metric": metric, "seeds": [r["seed"] for r in rs],
                      "mean": statistics.fmean(values), "ci95": ci95_half_width(values),
                      "accuracy_scored_mean": statistics.fmean(r["accuracy_scored"] for r in rs),
                      "invalid_generations_mean": statistics.fmean(r["invalid_generations"] for r in rs)})
    return table


def main(argv=None) -> int:
    ns = parse(argv)
    t0 = time.time()
    tmp = None
    if ns.smoke:
        tmp = tempfile.TemporaryDirectory()
        ns.model, ns.data_dir = "tiny-t5", str(write_smoke_glue(Path(tmp.name)))
        ns.tasks, ns.methods, ns.seeds = "sst2,rte,mrpc", "full,lora,lst", "0"
        specs = SMOKE_METHODS
    else:
        specs = METHODS
    if ns.data_dir is None:
        print("glue_t5: give --data-dir with your GLUE copy (docs/data.md), or --smoke", file=sys.stderr)
        return 2
    tasks, methods = ns.tasks.split(","), ns.methods.split(",")
    unknown = [m for m in methods if m not in specs]
    if unknown:
        print(f"glue_t5: unknown method(s) {unknown}; allowed: {', '.join(specs)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in ns.seeds.split(",")]
    runs = Path(tmp.name if tmp else "runs") / "glue_t5"
    rows = []
    for task in tasks:
        for method in methods:
            spec, lr = specs[method]
            for seed in seeds:
                rows.append(run_one(ns.model, task, ns.data_dir, method, spec, lr, seed, ns.smoke, runs))
                print(json.dumps(rows[-1]), flush=True)
    target_length = label_length(ns.model, tasks, ns.data_dir)
    record = {
        "command": "python benchmarks/glue_t5.py " + ("--smoke" if ns.smoke else
                                                      f"--model {ns.model} --tasks {ns.tasks} --methods {ns.methods} "
                                                      f"--seeds {ns.seeds}"),
        "model": ns.model, "smoke": ns.smoke, "objective": "seq2seq", "target_length": target_length,
        "methods": {m: {"spec": specs[m][0], "lr": specs[m][1]} for m in methods},
        "runs": rows, "summary": summarise(rows),
        "plan": plan_rows(ns.model, methods, specs, target_length, ns.smoke),
        "seconds": time.time() - t0,
    }
    Path(ns.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

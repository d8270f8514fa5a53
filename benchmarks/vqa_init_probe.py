"""What each method's features carry before training, on the offline VQA task (memtune issue #18): ridge probes
on the features the new head reads (`model.features`, eval mode, at initialisation), for three targets.

    python benchmarks/vqa_init_probe.py [--methods full,lora,sherl,lst,lst:r=2] [--template B3]

- question: which of the template's question wordings was asked (B3: 4);
- answer: the template's answer (B3: yes/no), which needs both modalities;
- image: the digit's class, from the C1 examples ("what is this?": the answer is the class).

A template whose answer is the XOR of a question attribute and an image attribute (B3) starts every method on a
symmetric saddle: loss ln 2, no gradient toward either modality alone. What a head can read off the features at
initialisation is then the signal training starts from. The probe standardises each feature on the training
examples and solves one-vs-all ridge regression (lambda 10) on them; accuracy is on the test examples.
Writes benchmarks/vqa-digits-<template>/init_probe.json and init_probe.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import memtune  # noqa: E402
from memtune.data import load_task, make_collate  # noqa: E402
from memtune.data.vqa import load_vqa_task  # noqa: E402
from memtune.spec import parse_spec, split_specs, validate_spec  # noqa: E402
from vqa_compare import IMAGE_SIZE, MAX_LENGTH, MODEL, TRAIN_LIMIT  # noqa: E402

RIDGE = 10.0


def features(model, collate, examples) -> torch.Tensor:
    """B×F: the features `model`'s head reads for `examples`, without autograd."""
    xs = []
    for i in range(0, len(examples), 64):
        batch = collate(examples[i:i + 64])
        batch.pop("labels")
        with torch.no_grad():
            xs.append(model.features(batch).float())
    return torch.cat(xs)


def ridge_probe(x_train, x_test, y_train, y_test) -> float:
    """Test accuracy of one-vs-all ridge regression on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mean) / std, (x_test - mean) / std
    targets = torch.nn.functional.one_hot(y_train, int(y_train.max()) + 1).float()
    w = torch.linalg.solve(a.T @ a + RIDGE * torch.eye(a.shape[1]), a.T @ targets)
    return ((b @ w).argmax(1) == y_test).float().mean().item()


def probe_method(spec: str, template: str, seed: int) -> dict:
    """One method's row: the probes' test accuracies and their class counts. The question and answer probes
    read the same features of the template's examples; the image probe reads those of C1's."""
    torch.manual_seed(seed)
    loaded = memtune.load_model(MODEL)
    task, control = (load_task(f"digits-vqa/{t}", seed=seed, train_limit=TRAIN_LIMIT) for t in (template, "C1"))
    collate = make_collate(task.kind, loaded.preprocessor, max_length=MAX_LENGTH, image_size=IMAGE_SIZE)
    parsed = validate_spec(parse_spec(spec))
    # One model per method: the head's width (the template's answers) does not change the features.
    model = memtune.wrap(loaded, memtune.config_for(parsed.method, parsed.options), num_labels=len(task.label_names),
                         techniques=parsed.techniques).eval()
    x_task, x_control = ([features(model, collate, list(split)) for split in (t.train, t.test)]
                         for t in (task, control))
    wording = {text: i for i, text in enumerate(sorted({e["text"] for e in task.train}))}
    targets = {"question": (task, x_task, lambda e: wording[e["text"]]), "answer": (task, x_task, lambda e: e["label"]),
               "image": (control, x_control, lambda e: e["label"])}
    row = {"method": spec, "feature_width": x_task[0].shape[1]}
    for target, (t, x, label) in targets.items():
        y_train, y_test = (torch.tensor([label(e) for e in split]) for split in (t.train, t.test))
        row[target] = ridge_probe(*x, y_train, y_test)
        row[f"{target}_classes"] = int(y_train.max()) + 1
        row[f"{target}_test_examples"] = len(y_test)
    return row


def markdown(rows: list[dict], template: str, chance: float) -> str:
    lines = [f"| method | feature width | question ({rows[0]['question_classes']} wordings) | "
             f"image ({rows[0]['image_classes']} classes) | {template} answer (chance {chance:g}) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['feature_width']} | {r['question']:.3f} | {r['image']:.3f} | {r['answer']:.3f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="full,lora,sherl,lst,lst:r=2")
    p.add_argument("--template", default="B3")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = HERE / f"vqa-digits-{args.template.lower()}"
    out.mkdir(exist_ok=True)
    command = "python benchmarks/vqa_init_probe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    check_record(out / "init_probe.json", args.seed)
    chance = load_vqa_task(f"digits-vqa/{args.template}").chance[args.template]     # either modality alone
    for spec in split_specs(args.methods):
        start = time.time()
        row = probe_method(spec, args.template, args.seed)
        print(f"{spec}: {row} ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
        write(out, row, command.strip(), args, chance)


def check_record(path: Path, seed: int) -> None:
    """Refuse to add rows to a record of another model or seed (before any probe runs)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    if data.get("model") not in (None, MODEL) or data.get("seed") not in (None, seed):
        raise SystemExit(f"{path} holds probes of {data.get('model')} with seed {data.get('seed')}, not {MODEL} "
                         f"with seed {seed}; move it away first")


def write(out: Path, row: dict, command: str, args, chance: float) -> None:
    """Add `row` to the probe record (replacing a row of the same method spec) and rewrite its table, after
    every method, so an interrupted run keeps what it measured."""
    path = out / "init_probe.json"
    data = json.loads(path.read_text()) if path.exists() else {"commands": [], "rows": []}
    data.update(model=MODEL, seed=args.seed, ridge=RIDGE)
    if command not in data["commands"]:
        data["commands"].append(command)
    data["rows"] = [r for r in data["rows"] if r["method"] != row["method"]] + [row]
    path.write_text(json.dumps(data, indent=1) + "\n")
    (out / "init_probe.md").write_text(markdown(data["rows"], args.template, chance) + "\n")


if __name__ == "__main__":
    main()

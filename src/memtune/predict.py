"""`memtune predict`: class names and probabilities of a trained adapter on new inputs (a text-to-text adapter:
the probabilities of its label words, from their likelihoods; a regression adapter: its predicted value).

    memtune predict --model minilm --adapter runs/x --text "a fine film" --text "dull"
    memtune predict --model minilm --adapter runs/x --file reviews.csv --json      # JSON lines
    memtune predict --model minilm --adapter runs/pairs --text "a cat sat" --text-pair "a cat was sitting"
    memtune predict --model minilm --adapter runs/pairs --file pairs.csv --text-column sentence1,sentence2
    memtune predict --model tiny-vit --adapter runs/img --image cat.png

The tokenizer or image processor is the base model's own; max_length and image_size are the ones the
adapter was trained with (adapter_config.json `preprocessing`, else the run's metrics.json).
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

BATCH = 32


def read_inputs(path: Path, text_column: str) -> list:
    """The inputs of --file: the text column of a .csv / .jsonl file (two comma-separated columns: (a, b) sentence
    pairs), else one input per non-blank line."""
    from .data import TaskError
    from .data.user_files import json_objects, read_utf8

    raw = read_utf8(path, "input")
    columns = [c.strip() for c in text_column.split(",")]
    suffix = path.suffix.lower()
    if len(columns) > 2 or (len(columns) == 2 and suffix not in (".csv", ".jsonl")):
        raise TaskError(f"--text-column {text_column!r}: give one column, or two (a,b) of a .csv/.jsonl file")

    def take(row: dict):
        return row[columns[0]] if len(columns) == 1 else tuple(row[c] for c in columns)

    if suffix == ".csv":
        rows = list(csv.DictReader(raw.splitlines()))
        missing = [c for c in columns if rows and c not in rows[0]]
        if missing:
            raise TaskError(f"--file {path} has no column {missing[0]!r} (columns: {', '.join(rows[0])}); "
                            "choose one with --text-column")
        return [take(r) for r in rows]
    if suffix == ".jsonl":
        texts = []
        for n, obj in json_objects(raw, path, f'{{"{columns[0]}": "..."}}'):
            for c in columns:
                if not isinstance(obj.get(c), str):
                    raise TaskError(f"--file {path}: line {n} has no string field {c!r}")
            texts.append(take(obj))
        return texts
    return [line for line in raw.splitlines() if line.strip()]


def _example(key: str, x) -> dict:
    """A collate example for one input: an image, a text, or a sentence pair (a, b)."""
    if isinstance(x, tuple):
        return {"text": x[0], "text_pair": x[1], "label": 0}
    return {key: x, "label": 0}


def preprocessing_of(adapter: Path, saved: dict) -> dict:
    """max_length / image_size the adapter was trained with (adapter_config.json, else metrics.json)."""
    found = dict(saved.get("preprocessing") or {})
    metrics = adapter / "metrics.json"
    if metrics.is_file():
        try:
            settings = json.loads(metrics.read_text(encoding="utf-8")).get("settings", {})
        except (ValueError, AttributeError):
            settings = {}
        for key in ("max_length", "image_size"):
            found.setdefault(key, settings.get(key))
    return {"max_length": found.get("max_length") or 128, "image_size": found.get("image_size")}


def predict(model, loaded, inputs: list, preprocessing: dict) -> list[dict[str, float]]:
    """Class probabilities for each input (texts, (a, b) sentence pairs, or uint8 image arrays), by class name;
    for a regression adapter {"value": the predicted number}."""
    import torch

    from .checkpoint import label_names
    from .data import make_collate
    from .seq2seq import model_label_targets

    names = label_names(model) or [str(i) for i in range(model.num_labels)]
    collate = make_collate(loaded.modality, loaded.preprocessor, max_length=preprocessing["max_length"],
                           image_size=preprocessing["image_size"])
    key = "text" if loaded.modality == "text" else "image"
    targets = model_label_targets(model, loaded.preprocessor)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs), BATCH):
            batch = collate([_example(key, x) for x in inputs[start:start + BATCH]])
            batch.pop("labels")
            if model.objective == "regression":
                out += [{"value": v} for v in model(**batch).logits.float().squeeze(-1).tolist()]
                continue
            probs = torch.softmax(class_scores(model, batch, targets).float(), dim=-1)        # B×C
            out += [dict(zip(names, row)) for row in probs.tolist()]
    return out


def class_scores(model, batch, targets):
    """B×C scores whose softmax is the class probabilities: the head's logits, or for a text-to-text model the
    log-likelihoods of the label words (constrained scoring)."""
    if model.objective == "seq2seq":
        from .seq2seq import score_label_words

        return score_label_words(model, batch, targets)
    return model(**batch).logits


def cmd_predict(ns) -> int:
    from .api import load
    from .checkpoint import read_adapter_config
    from .data import TaskError
    from .data.image_folder import _read_image
    from .models import load_model
    from .train import ArgumentError

    adapter = Path(ns.adapter)
    saved = read_adapter_config(adapter)
    if saved.get("objective") == "causal-lm":
        raise ArgumentError(f"{adapter} is a causal-LM adapter: it generates text and has no classes to predict; "
                            "memtune predict scores classification adapters (memtune eval reports its perplexity)")
    loaded = load_model(ns.model)
    if loaded.modality == "image":
        paths = [*ns.image, *(read_inputs(Path(ns.file), ns.text_column) if ns.file else [])]
        if ns.text:
            raise ArgumentError("--text does not apply to an image adapter; give --image PATH or --file with paths")
        shown, inputs = paths, [_read_image(Path(p)) if Path(p).is_file() else _missing_image(p) for p in paths]
    else:
        if ns.image:
            raise ArgumentError("--image does not apply to a text adapter; give --text or --file")
        if ns.text_pair and len(ns.text_pair) != len(ns.text):
            raise ArgumentError(f"--text-pair: {len(ns.text_pair)} second texts for {len(ns.text)} --text; give one "
                                "--text-pair per --text, in the same order")
        texts = list(zip(ns.text, ns.text_pair)) if ns.text_pair else list(ns.text)
        inputs = shown = [*texts, *(read_inputs(Path(ns.file), ns.text_column) if ns.file else [])]
    if not inputs:
        raise TaskError("nothing to predict: give --text TEXT (repeatable), --image PATH or --file FILE")
    model = load(loaded, adapter)
    for shown_input, probs in zip(shown, predict(model, loaded, inputs, preprocessing_of(adapter, saved))):
        if "value" in probs:                                        # regression
            print(json.dumps({"input": shown_input, "value": probs["value"]}) if ns.json
                  else f"{probs['value']:.4f}\t{_one_line(shown_input)}")
            continue
        label = max(probs, key=probs.get)
        if ns.json:
            print(json.dumps({"input": shown_input, "label": label, "probabilities": probs}))
        else:
            others = ", ".join(f"{n} {p:.4f}" for n, p in sorted(probs.items(), key=lambda kv: -kv[1])[1:])
            print(f"{label}\t{probs[label]:.4f}\t({others})\t{_one_line(shown_input)}")
    sys.stdout.flush()
    return 0


def _missing_image(path: str):
    from .data import TaskError

    raise TaskError(f"image {path}: no such file")


def _one_line(text, limit: int = 80) -> str:
    text = " | ".join(text) if isinstance(text, tuple) else text
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"

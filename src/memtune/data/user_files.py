"""Readers for user text data: ``csv:PATH`` and ``jsonl:PATH``.

Both produce rows of (texts, raw label, split or None, line number), where texts holds one string, or two
for sentence pairs (``text_column="sentence1,sentence2"``); ``build_text_task`` turns them into a Task.
Every problem becomes a TaskError that names the file, the line and what was expected.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path

from .base import Task, TaskError
from .splits import stratified_split

SPLIT_COLUMN = "split"
SPLIT_VALUES = ("train", "test")
USER_SPLIT_SALT = "memtune-user-split-v1"
_INT = re.compile(r"[+-]?\d+")


def read_utf8(path: Path, kind: str) -> str:
    """The text of a UTF-8 file (a byte-order mark dropped); TaskError when missing, not UTF-8 or empty."""
    if not path.exists():
        raise TaskError(f"{kind} file not found: {path}")
    if not path.is_file():
        raise TaskError(f"{kind} path is not a file: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise TaskError(
            f"{path} is not valid UTF-8: byte {data[err.start]:#04x} at byte offset "
            f"{err.start} (line {line}); save the file as UTF-8"
        ) from None
    if not text.strip():
        raise TaskError(f"{kind} file is empty: {path}")
    return text


def text_columns(text_column: str) -> tuple[str, ...]:
    """``"text"`` -> ("text",); ``"a,b"`` -> ("a", "b"): the column of single texts or the two of a pair."""
    names = tuple(c.strip() for c in str(text_column).split(","))
    if not 1 <= len(names) <= 2 or not all(names):
        raise TaskError(f"text column {text_column!r}: give one column name, or two separated by a comma "
                        "for sentence pairs (e.g. sentence1,sentence2)")
    return names


def read_csv(path: Path, text_column: str, label_column: str):
    """Rows of a comma-separated file with a header line."""
    raw = read_utf8(path, "CSV")
    texts = text_columns(text_column)
    reader = csv.reader(io.StringIO(raw, newline=""), strict=True)
    try:
        header = next(reader)
        columns = [c.strip() for c in header]
        missing = [c for c in (*texts, label_column) if c not in columns]
        if missing:
            raise TaskError(
                f"{path}: column(s) {missing} not found; columns found: {columns} "
                "(choose others with text_column= / label_column=)"
            )
        tis, li = [columns.index(c) for c in texts], columns.index(label_column)
        si = columns.index(SPLIT_COLUMN) if SPLIT_COLUMN in columns else None
        rows = []
        start = reader.line_num + 1  # first physical line of the next record
        for record in reader:
            line = start
            start = reader.line_num + 1
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # blank line
            if len(record) != len(columns):
                raise TaskError(
                    f"{path}: malformed CSV at line {line}: {len(record)} fields, "
                    f"header has {len(columns)}"
                )
            split = record[si] if si is not None else None
            rows.append((tuple(record[i] for i in tis), record[li], split, line))
    except csv.Error as err:
        raise TaskError(f"{path}: malformed CSV at line {reader.line_num}: {err}") from None
    if not rows:
        raise TaskError(f"CSV file is empty (header only, no data rows): {path}")
    return rows


def read_jsonl(path: Path, text_column: str, label_column: str):
    """Rows of a JSON-lines file: one JSON object per non-blank line."""
    raw = read_utf8(path, "JSONL")
    texts = text_columns(text_column)
    rows = []
    example = "{" + ", ".join(f'"{c}": "..."' for c in texts) + f', "{label_column}": ...}}'
    for line_no, obj in json_objects(raw, path, example):
        missing = [c for c in (*texts, label_column) if c not in obj]
        if missing:
            raise TaskError(
                f"{path}: line {line_no} has no field(s) {missing}; fields found: "
                f"{sorted(obj)} (choose others with text_column= / label_column=)"
            )
        rows.append((tuple(obj[c] for c in texts), obj[label_column], obj.get(SPLIT_COLUMN), line_no))
    if not rows:
        raise TaskError(f"JSONL file is empty: {path}")
    return rows


def json_objects(raw: str, path: Path, example: str):
    """(line number, object) for every non-blank line of a JSON-lines text; a line that is not JSON, or not
    a JSON object (`example` shows one), is a TaskError naming the file and the line."""
    for line_no, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise TaskError(f"{path}: malformed JSON at line {line_no}: {err.msg}") from None
        if not isinstance(obj, dict):
            raise TaskError(
                f"{path}: line {line_no} is a JSON {type(obj).__name__}, expected an object like {example}"
            )
        yield line_no, obj


def _labels(rows, path: Path):
    """Map raw labels to ids.

    All-integer labels (JSON ints or integer strings in CSV) are used as ids
    directly, named "0".."max". Anything else is a string label: sorted unique
    values become ids 0..K-1 and keep their names.
    """
    raws = []
    for _, label, _, line in rows:
        if isinstance(label, bool) or label is None or isinstance(label, (float, list, dict)):
            raise TaskError(
                f"{path}: line {line}: label {label!r} is not an integer or a string"
            )
        if isinstance(label, str) and not label.strip():
            raise TaskError(f"{path}: line {line}: empty label")
        raws.append(label.strip() if isinstance(label, str) else label)
    if all(isinstance(v, int) or _INT.fullmatch(v) for v in raws):
        ids = [int(v) for v in raws]
        for (_, _, _, line), y in zip(rows, ids):
            if y < 0:
                raise TaskError(
                    f"{path}: line {line}: negative label {y}; integer labels must be 0..K-1 "
                    "(or use string labels)"
                )
        names = [str(i) for i in range(max(ids) + 1)]
        present = sorted(set(ids))
    else:
        present = sorted({str(v) for v in raws})
        index = {name: i for i, name in enumerate(present)}
        ids = [index[str(v)] for v in raws]
        names = present
    if len(present) < 2:
        raise TaskError(
            f"{path}: found {len(present)} class ({present}); classification needs at least 2 classes"
        )
    return ids, names


def _float_labels(rows, path: Path) -> list[float]:
    """Regression targets: numbers (JSON numbers or numeric strings in CSV), finite."""
    values = []
    for _, label, _, line in rows:
        try:
            if isinstance(label, bool) or label is None or isinstance(label, (list, dict)):
                raise ValueError
            value = float(label.strip() if isinstance(label, str) else label)
        except ValueError:
            raise TaskError(f"{path}: line {line}: label {label!r} is not a number (a regression task needs "
                            "numeric targets)") from None
        if not math.isfinite(value):
            raise TaskError(f"{path}: line {line}: label {label!r} is not a finite number")
        values.append(value)
    return values


def make_example(texts, label, where: str) -> dict:
    """{"text": a, "label": y} or, for a pair, {"text": a, "text_pair": b, "label": y}; `where` names the
    file and line for the error when a text is not a string."""
    for t in texts:
        if not isinstance(t, str):
            raise TaskError(f"{where}: text must be a string, got {t!r}")
    ex = {"text": texts[0], "label": label}
    if len(texts) == 2:
        ex["text_pair"] = texts[1]
    return ex


def build_text_task(name: str, path: Path, rows, regression: bool = False) -> Task:
    if regression:
        ids, label_names = _float_labels(rows, path), []
    else:
        ids, label_names = _labels(rows, path)
    examples = [make_example(texts, y, f"{path}: line {line}") for (texts, _, _, line), y in zip(rows, ids)]
    splits = [split for _, _, split, _ in rows]
    if any(s is not None for s in splits):
        train, test = [], []
        for ex, split, (_, _, _, line) in zip(examples, splits, rows):
            value = str(split).strip().lower() if split is not None else ""
            if value not in SPLIT_VALUES:
                raise TaskError(
                    f"{path}: line {line}: split value {split!r} is not one of {list(SPLIT_VALUES)}"
                )
            (train if value == "train" else test).append(ex)
        for part, rows_part in (("train", train), ("test", test)):
            if not rows_part:
                raise TaskError(f"{path}: the '{SPLIT_COLUMN}' column has no {part!r} rows")
    else:
        # Regression: one stratum, so the split is a fixed hashed 80/20 of the rows.
        train_idx, test_idx = stratified_split([0] * len(ids) if regression else ids, salt=USER_SPLIT_SALT)
        train = [examples[i] for i in train_idx]
        test = [examples[i] for i in test_idx]
    return Task(name=name, kind="text", train=train, test=test, label_names=label_names, regression=regression)

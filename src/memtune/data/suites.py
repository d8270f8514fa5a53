"""The standard suites from the user's own copy: ``glue/<name>``, ``super_glue/<name>`` and ``vtab/<name>``.

memtune never downloads them: the data lives in a local folder given by ``--data-dir DIR`` (Python:
``load_task(..., data_dir=DIR)``) or the environment variable ``MEMTUNE_DATA_DIR``. A task's folder is found
as ``DIR/<suite>/<name>`` or ``DIR/<name>``, folder names matched without case, ``-`` or ``_`` (so GLUE's own
``glue_data/SST-2`` and ``STS-B`` are found as sst2 / stsb, SuperGLUE's ``BoolQ`` as boolq).

GLUE / SuperGLUE task folder: one file (or folder) per split, named ``train`` and ``validation`` (also
``dev`` / ``val``; MNLI: ``validation_matched`` / ``dev_matched``), as ``.tsv``, ``.csv``, ``.jsonl`` /
``.json`` (JSON lines), ``.parquet`` or an arrow folder written by ``datasets``' ``save_to_disk`` (both
read with pyarrow, which memtune installs; the datasets library is not needed). The columns are the Hugging Face
``datasets`` names (sentence1/sentence2, question/sentence, premise/hypothesis, label) or the original
distribution's (``#1 String`` / ``Quality`` in MRPC, ``score`` in STS-B, ``gold_label`` in MNLI, ...).
Labels are ids or the class names below (``entailment``, ``true``, ...). GLUE's test labels are hidden,
so the validation split is the test split memtune reports; a training validation split
(``val_fraction``) is carved from train as for any task.

VTAB-1k task folder (the layout most VTAB-1k copies use, e.g. ``vtab-1k/cifar``): list files
``train800.txt``, ``val200.txt``, ``train800val200.txt`` and ``test.txt``, one ``<image path relative to
the folder> <integer label>`` per line; or class folders ``train800/<class>/``, ``val200/<class>/`` and
``test/<class>/``. memtune trains on the 1,000 train800val200 images and tests on test; with a validation
split asked for (``val_fraction`` > 0) it trains on train800 and validates on val200, VTAB's own split.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .base import Task, TaskError
from .image_folder import IMAGE_SUFFIXES, _class_dirs, _images_in, _read_image
from .splits import stratified_subset
from .user_files import make_example, read_utf8

DATA_DIR_ENV = "MEMTUNE_DATA_DIR"
SUITES = ("glue", "super_glue", "vtab")
SPLIT_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".parquet")
_VALIDATION = ("validation", "dev", "val")


@dataclass(frozen=True)
class TextSuiteTask:
    """One GLUE / SuperGLUE task: where its texts and labels are, its classes and metrics (main first)."""

    texts: tuple[tuple[str, ...], ...]          # accepted text columns: one or two names, first match wins
    label_names: tuple[str, ...]                # class names in id order (empty: regression)
    metrics: tuple[str, ...]                    # GLUE's convention; the first is the main metric
    labels: tuple[str, ...] = ("label",)        # accepted label columns
    test: tuple[str, ...] = _VALIDATION         # the split memtune tests on
    prefix: str | None = None                   # a column put before the first text ("word: sentence")
    folder: str | None = None                   # the task folder, where it is another task's (default: the name)

    @property
    def regression(self) -> bool:
        return not self.label_names


_NLI = ("entailment", "not_entailment")
GLUE = {
    "cola": TextSuiteTask((("sentence",),), ("unacceptable", "acceptable"), ("mcc", "accuracy")),
    "sst2": TextSuiteTask((("sentence",),), ("negative", "positive"), ("accuracy",)),
    "mrpc": TextSuiteTask((("sentence1", "sentence2"), ("#1 String", "#2 String")), ("not_equivalent", "equivalent"),
                          ("f1", "accuracy"), labels=("label", "Quality")),
    "qqp": TextSuiteTask((("question1", "question2"),), ("not_duplicate", "duplicate"), ("f1", "accuracy"),
                         labels=("label", "is_duplicate")),
    "stsb": TextSuiteTask((("sentence1", "sentence2"),), (), ("pearson", "spearman"), labels=("label", "score")),
    "mnli": TextSuiteTask((("premise", "hypothesis"), ("sentence1", "sentence2")),
                          ("entailment", "neutral", "contradiction"), ("accuracy",), labels=("label", "gold_label"),
                          test=("validation_matched", "dev_matched")),
    "mnli_mismatched": TextSuiteTask((("premise", "hypothesis"), ("sentence1", "sentence2")),
                                     ("entailment", "neutral", "contradiction"), ("accuracy",),
                                     labels=("label", "gold_label"), test=("validation_mismatched", "dev_mismatched"),
                                     folder="mnli"),
    "qnli": TextSuiteTask((("question", "sentence"),), _NLI, ("accuracy",)),
    "rte": TextSuiteTask((("sentence1", "sentence2"),), _NLI, ("accuracy",)),
    "wnli": TextSuiteTask((("sentence1", "sentence2"),), ("not_entailment", "entailment"), ("accuracy",)),
}
SUPER_GLUE = {
    "boolq": TextSuiteTask((("question", "passage"),), ("false", "true"), ("accuracy",)),
    "cb": TextSuiteTask((("premise", "hypothesis"),), ("entailment", "contradiction", "neutral"),
                        ("macro_f1", "accuracy")),
    "rte": TextSuiteTask((("premise", "hypothesis"),), _NLI, ("accuracy",)),
    # WiC: does `word` mean the same in both sentences? The word goes before the first sentence.
    "wic": TextSuiteTask((("sentence1", "sentence2"),), ("false", "true"), ("accuracy",), prefix="word"),
}
TEXT_SUITES = {"glue": GLUE, "super_glue": SUPER_GLUE}
# Folder names a suite's parent folder may have (normalised: lower case, no - _ or space).
_SUITE_FOLDERS = {"glue": ("glue", "gluedata"), "super_glue": ("superglue",), "vtab": ("vtab", "vtab1k")}
VTAB_TASKS = ("caltech101", "cifar", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397",
              "patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy", "clevr_count", "clevr_dist",
              "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi", "smallnorb_ele")


def suite_names() -> list[str]:
    """Every suite task name memtune knows: glue/cola, ..., vtab/<name> for the 19 VTAB-1k tasks."""
    return ([f"{s}/{n}" for s, tasks in TEXT_SUITES.items() for n in tasks]
            + [f"vtab/{n}" for n in VTAB_TASKS])


def is_suite_name(key: str) -> bool:
    return key.partition("/")[0] in SUITES and "/" in key


def _norm(name: str) -> str:
    return re.sub(r"[-_ ]", "", name.lower())


# ------------------------------------------------------------------------------------------ finding folders
def _data_dir(data_dir, name: str, layout: str) -> Path:
    given = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    if given is None:
        raise TaskError(f"{name}: memtune does not download suites; put your copy in a folder and pass "
                        f"--data-dir DIR (or set {DATA_DIR_ENV}=DIR), with {layout}")
    path = Path(given).expanduser()
    if not path.is_dir():
        raise TaskError(f"{name}: data folder {path} does not exist (--data-dir / {DATA_DIR_ENV}); it should hold "
                        f"{layout}")
    return path


def _children(folder: Path, names) -> list[Path]:
    """The sub-folders of `folder` whose name, normalised, is one of `names`' (sorted)."""
    wanted = {_norm(n) for n in names}
    return [p for p in (sorted(folder.iterdir()) if folder.is_dir() else []) if p.is_dir() and _norm(p.name) in wanted]


def find_task_folder(data_dir, suite: str, task: str, layout: str) -> Path:
    """DIR/<suite>/<task> or DIR/<task> (names matched without case, '-', '_'); TaskError naming both."""
    name = f"{suite}/{task}"
    root = _data_dir(data_dir, name, layout)
    parents = [*_children(root, _SUITE_FOLDERS[suite]), root]
    for parent in parents:
        found = _children(parent, [task])
        if found:
            return found[0]
    raise TaskError(f"{name}: no folder {task}/ in {' or '.join(str(p) for p in parents)}; expected {layout}")


# ------------------------------------------------------------------------------------------- reading splits
def split_source(folder: Path, names) -> Path | None:
    """The file (or arrow folder) of a split: <name>.tsv/.csv/.jsonl/.json/.parquet or <name>/ (first found)."""
    for name in names:
        for suffix in SPLIT_SUFFIXES:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
        if (folder / name).is_dir():
            return folder / name
    return None


def read_records(source: Path) -> list[dict]:
    """Rows of a split as dicts (column → value), whatever the format."""
    suffix = source.suffix.lower() if source.is_file() else ""
    if suffix in (".tsv", ".csv"):
        raw = read_utf8(source, suffix[1:].upper())
        # GLUE's TSVs hold unbalanced quotes inside sentences: tabs separate, quotes are text.
        kw = dict(delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else {}
        return [dict(r) for r in csv.DictReader(io.StringIO(raw, newline=""), **kw)]
    if suffix in (".jsonl", ".json"):
        from .user_files import json_objects

        return [obj for _, obj in json_objects(read_utf8(source, "JSONL"), source, '{"sentence": ..., "label": ...}')]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise TaskError(f"reading {source} needs pyarrow (pip install pyarrow), or save the split as .csv, .tsv "
                            "or .jsonl") from None
        return pq.read_table(source).to_pylist()
    return _read_arrow_folder(source)


def _read_arrow_folder(folder: Path) -> list[dict]:
    """A split saved by `datasets`' save_to_disk: state.json names its data-*.arrow files (Arrow IPC streams),
    read with pyarrow (the datasets library itself is not needed)."""
    try:
        import pyarrow as pa
    except ImportError:
        raise TaskError(f"{folder} looks like a `datasets` save_to_disk folder; reading it needs pyarrow (pip install "
                        "pyarrow), or save the split as .csv, .tsv or .jsonl") from None
    state = folder / "state.json"
    try:
        names = ([f["filename"] for f in json.loads(state.read_text(encoding="utf-8"))["_data_files"]]
                 if state.is_file() else sorted(p.name for p in folder.glob("data-*.arrow")))
    except (ValueError, KeyError, TypeError) as e:
        raise TaskError(f"{state}: unreadable ({e!r}); expected the state.json that datasets' save_to_disk "
                        "writes") from None
    if not names:
        raise TaskError(f"{folder}: no data-*.arrow files; a `datasets` save_to_disk split folder holds "
                        "state.json and data-*.arrow")
    try:
        tables = [pa.ipc.open_stream(pa.memory_map(str(folder / n))).read_all() for n in names]
    except (OSError, pa.ArrowInvalid) as e:
        raise TaskError(f"{folder}: not a readable `datasets` folder ({e})") from None
    return pa.concat_tables(tables).to_pylist()


# ---------------------------------------------------------------------------------------------- GLUE tasks
def _text_layout(suite: str, task: str, spec: TextSuiteTask) -> str:
    return (f"DIR/{suite}/{spec.folder or task}/train.tsv and {spec.test[0]}.tsv (or .csv, .jsonl, .parquet, or a `datasets` "
            f"save_to_disk folder) with columns {' + '.join(spec.texts[0])} and {spec.labels[0]}")


def _pick(columns, options, where: str, what: str):
    for option in options:
        if all(c in columns for c in option):
            return option
    raise TaskError(f"{where}: no {what} column(s) {' or '.join('+'.join(o) for o in options)}; columns found: "
                    f"{sorted(columns)}")


def _label(value, spec: TextSuiteTask, where: str):
    """A raw label (id, id string, class name, bool; a number for regression) -> id or float."""
    if spec.regression:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise TaskError(f"{where}: label {value!r} is not a number (regression target)") from None
    if isinstance(value, bool):
        value = int(value)
    text = str(value).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        y = int(text)
    else:
        names = [n.lower() for n in spec.label_names]
        if text.lower() not in names:
            raise TaskError(f"{where}: label {value!r} is not a class id 0..{len(names) - 1} or one of "
                            f"{list(spec.label_names)}")
        y = names.index(text.lower())
    if not 0 <= y < len(spec.label_names):
        raise TaskError(f"{where}: label {y} is outside 0..{len(spec.label_names) - 1} ({list(spec.label_names)}); "
                        "test splits without labels (-1) cannot be used")
    return y


def _examples(records: list[dict], spec: TextSuiteTask, source: Path) -> list[dict]:
    if not records:
        raise TaskError(f"{source}: no rows")
    columns = set(records[0])
    texts = _pick(columns, spec.texts, str(source), "text")
    label = _pick(columns, [(c,) for c in spec.labels], str(source), "label")[0]
    out = []
    for i, row in enumerate(records, start=1):
        where = f"{source}: row {i}"
        values = [row[c] for c in texts]
        if spec.prefix is not None and spec.prefix in row:
            values[0] = f"{row[spec.prefix]}: {values[0]}"
        out.append(make_example(tuple(values), _label(row[label], spec, where), where))
    return out


def load_text_suite(suite: str, task: str, data_dir) -> Task:
    spec = TEXT_SUITES[suite][task]
    layout = _text_layout(suite, task, spec)
    folder = find_task_folder(data_dir, suite, spec.folder or task, layout)
    splits = {}
    for part, names in (("train", ("train",)), ("test", spec.test)):
        source = split_source(folder, names)
        if source is None:
            raise TaskError(f"{suite}/{task}: {folder} has no {names[0]} split; expected {layout}")
        splits[part] = _examples(read_records(source), spec, source)
    return Task(name=f"{suite}/{task}", kind="text", train=splits["train"], test=splits["test"],
                label_names=list(spec.label_names), regression=spec.regression, metrics=spec.metrics)


# ---------------------------------------------------------------------------------------------- VTAB-1k
_VTAB_LAYOUT = ("DIR/vtab/<name>/ (e.g. vtab-1k/cifar) with train800.txt, val200.txt, train800val200.txt and "
                "test.txt listing '<image path> <label>' per line, or class folders train800/<class>/, "
                "val200/<class>/ and test/<class>/")


def _list_file(folder: Path, name: str) -> list[tuple[Path, int]] | None:
    path = folder / f"{name}.txt"
    if not path.is_file():
        return None
    pairs = []
    for line_no, line in enumerate(read_utf8(path, "VTAB list").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not re.fullmatch(r"\d+", parts[1]):
            raise TaskError(f"{path}: line {line_no}: expected '<image path> <integer label>', got {line.strip()!r}")
        image = folder / parts[0]
        if not image.is_file():
            raise TaskError(f"{path}: line {line_no}: image {image} not found")
        pairs.append((image, int(parts[1])))
    if not pairs:
        raise TaskError(f"VTAB list file is empty: {path}")
    return pairs


def _class_folder(folder: Path, name: str) -> dict[str, list[Path]] | None:
    root = folder / name
    if not root.is_dir():
        return None
    found = {c.name: _images_in(c) for c in _class_dirs(root)}
    return {c: files for c, files in found.items() if files} or None


def _vtab_splits(folder: Path, name: str):
    """(train800, val200, train800val200, test) as (path, label) lists, and the label names."""
    lists = {s: _list_file(folder, s) for s in ("train800", "val200", "train800val200", "test")}
    if lists["test"] is not None and (lists["train800val200"] or (lists["train800"] and lists["val200"])):
        k = 1 + max(y for pairs in lists.values() if pairs for _, y in pairs)
        label_names = [str(i) for i in range(k)]
    else:
        dirs = {s: _class_folder(folder, s) for s in ("train800", "val200", "train800val200", "test")}
        if dirs["test"] is None or not (dirs["train800val200"] or (dirs["train800"] and dirs["val200"])):
            raise TaskError(f"vtab/{name}: {folder} has neither the list files nor the class folders; expected "
                            f"{_VTAB_LAYOUT} ({'/'.join(IMAGE_SUFFIXES)} images)")
        label_names = sorted({c for d in dirs.values() if d for c in d})
        index = {c: i for i, c in enumerate(label_names)}
        lists = {s: [(p, index[c]) for c in sorted(d) for p in d[c]] if d else None for s, d in dirs.items()}
    if lists["train800val200"] is None:
        lists["train800val200"] = lists["train800"] + lists["val200"]
    if len(label_names) < 2:
        raise TaskError(f"vtab/{name}: {folder} has {len(label_names)} class; classification needs at least 2")
    return lists, label_names


def load_vtab(name: str, data_dir, *, validation: bool, train_limit=None, test_limit=None, seed: int = 0) -> Task:
    """A VTAB-1k task; limits pick files before decoding (VTAB's test sets are large)."""
    folder = find_task_folder(data_dir, "vtab", name, _VTAB_LAYOUT)
    lists, label_names = _vtab_splits(folder, name)
    if validation and not (lists["train800"] and lists["val200"]):
        raise TaskError(f"vtab/{name}: a validation split needs train800 and val200 in {folder}; expected "
                        f"{_VTAB_LAYOUT}")
    train = lists["train800"] if validation else lists["train800val200"]

    def pick(pairs, limit, stream):
        return [pairs[i] for i in stratified_subset([y for _, y in pairs], limit, seed, stream)]

    load = lambda pairs: [{"image": _read_image(p), "label": y} for p, y in pairs]  # noqa: E731
    task = Task(name=f"vtab/{name}", kind="image", train=load(pick(train, train_limit, 0)),
                test=load(pick(lists["test"], test_limit, 1)), label_names=label_names,
                metrics=("accuracy",))
    if validation:
        task.validation = load(lists["val200"])
    return task


def load_suite(key: str, data_dir, *, validation: bool = False, train_limit=None, test_limit=None,
               seed: int = 0) -> Task:
    """``glue/<name>``, ``super_glue/<name>`` or ``vtab/<name>`` from the local copy (module docstring)."""
    suite, _, task = key.partition("/")
    task = _norm(task) if suite != "vtab" else task.lower()
    if suite == "vtab":
        if not task:
            raise TaskError(f"give a VTAB-1k task after 'vtab/', e.g. vtab/cifar (the usual names: "
                            f"{', '.join(VTAB_TASKS)})")
        return load_vtab(task, data_dir, validation=validation, train_limit=train_limit, test_limit=test_limit,
                         seed=seed)
    tasks = TEXT_SUITES[suite]
    by_norm = {_norm(n): n for n in tasks}
    if task not in by_norm:
        raise TaskError(f"unknown {suite} task {key!r}; {suite} tasks: {', '.join(f'{suite}/{n}' for n in tasks)}")
    return load_text_suite(suite, by_norm[task], data_dir)

"""Checks that run before a command writes anything: bad input fails here with one clear message.

`memtune train` checks its inputs in `train.build` / `TrainArgs.validate`; `eval` and `compare` call these
first, so that a bad batch size, a task the adapter cannot score, or a setting that would make every
method of a comparison fail is reported at once (exit code 2) instead of as a traceback or a results
table where every row failed.
"""
from __future__ import annotations

MAX_BATCH = 65536          # the same bound as TrainArgs.validate: larger is a typo, not a batch


def check_batch_size(value: int, flag: str = "--batch-size") -> None:
    from .train import ArgumentError

    if not 1 <= value <= MAX_BATCH:
        raise ArgumentError(f"{flag} must be between 1 and {MAX_BATCH}, got {value}")


# Task kinds read by models of another modality: image–caption pairs by image-text compositions.
TASK_MODALITY = {"image_caption": "image_text"}


def check_task_modality(kind: str, task_name: str, loaded) -> None:
    """The model reads the task's kind of data (ArgumentError naming the modality to pick otherwise)."""
    from .train import ArgumentError

    wanted = TASK_MODALITY.get(kind, kind)
    if wanted != loaded.modality:
        raise ArgumentError(f"task {task_name!r} holds {kind} data but model {loaded.name!r} reads "
                            f"{loaded.modality}; pick a {wanted} model")


def check_task_fits_model(task, task_name: str, loaded, model) -> None:
    """The task's data type matches the model, and its labels all index the adapter's head."""
    from .data import TaskError

    check_task_modality(task.kind, task_name, loaded)
    if model.objective == "classification" and getattr(model, "id2label", None) is None \
            and task.num_labels > model.num_labels:
        raise TaskError(f"task {task_name!r} has {task.num_labels} classes {task.label_names}, but the adapter's "
                        f"head predicts {model.num_labels}; evaluate it on the task it was trained on "
                        f"(or one with at most {model.num_labels} classes)")


def align_task_labels(task, task_name: str, model) -> str | None:
    """Make the task's test labels index the adapter's classes, matching them by name.

    Same names in the same order: nothing to do (None). The task's names a permutation or a subset of the
    adapter's: the test labels are renumbered to the adapter's ids and a note saying so is returned.
    Otherwise (a name the adapter does not know) TaskError naming both label sets. An adapter saved
    without class names is not checked by name (only by count, in `check_task_fits_model`).
    """
    from .checkpoint import label_names
    from .data import TaskError

    adapter = label_names(model)
    if model.objective not in ("classification", "seq2seq") or adapter is None or task.label_names == adapter:
        return None
    unknown = [n for n in task.label_names if n not in model.label2id]
    if unknown:
        raise TaskError(f"task {task_name!r} has classes {task.label_names}, the adapter was trained on "
                        f"{adapter}; {unknown} cannot be mapped to the adapter's classes by name")
    original = list(task.label_names)
    to_adapter = [model.label2id[n] for n in original]                 # task class id -> adapter class id
    task.test = [{**ex, "label": to_adapter[ex["label"]]} for ex in task.test]
    task.train = [{**ex, "label": to_adapter[ex["label"]]} for ex in task.train]
    task.label_names = list(adapter)
    kind = "a subset" if len(original) < len(adapter) else "a reordering"
    return (f"task {task_name!r} has classes {original}, {kind} of the adapter's {adapter}: "
            "labels mapped to the adapter's by name")


def check_compare(specs: list[str], settings: dict, model: str, task: str) -> None:
    """Every spec (method name, option values, techniques: `memtune.spec`), the run settings, model and task.

    What only a run can find out (a family the method does not support, running out of memory) becomes
    that method's row in the results, and the other methods still run.
    """
    from .data import load_task
    from .models import load_model
    from .spec import parse_specs
    from .train import TrainArgs, check_length

    parsed = parse_specs(specs)            # every spec: method, options, techniques (ConfigError)
    if any(p.techniques for p in parsed):
        from .techniques import MemoryTechniques

        for p in parsed:
            MemoryTechniques.from_names(p.techniques).check_device()     # offload needs a GPU here
    args = TrainArgs(model=model, task=task, **settings)
    args.validate()
    loaded = load_model(model)
    data = load_task(task, text_column=args.text_column, label_column=args.label_column, seed=args.seed,
                     train_limit=args.train_limit, test_limit=args.test_limit, data_dir=args.data_dir,
                     regression=args.objective == "regression")
    check_task_modality(data.kind, task, loaded)
    check_length(loaded, args.max_length)

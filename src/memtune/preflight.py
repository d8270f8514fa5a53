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


def check_task_fits_model(task, task_name: str, loaded, model) -> None:
    """The task's data type matches the model, and its labels all index the adapter's head."""
    from .data import TaskError
    from .train import ArgumentError

    if task.kind != loaded.modality:
        raise ArgumentError(f"task {task_name!r} holds {task.kind} data but model {loaded.name!r} reads "
                            f"{loaded.modality}")
    if model.objective == "classification" and task.num_labels > model.num_labels:
        raise TaskError(f"task {task_name!r} has {task.num_labels} classes {task.label_names}, but the adapter's "
                        f"head predicts {model.num_labels}; evaluate it on the task it was trained on "
                        f"(or one with at most {model.num_labels} classes)")


def check_compare(specs: list[str], settings: dict, model: str, task: str) -> None:
    """What every method of a comparison shares: the spec syntax, run settings, model and task.

    A problem of one method (unknown name, bad option value, unsupported family) is not checked here: it
    becomes that method's row in the results, and the other methods still run.
    """
    from .compare import parse_method_spec
    from .data import load_task
    from .methods import ConfigError
    from .models import load_model
    from .train import ArgumentError, TrainArgs, check_length

    for spec in specs:
        try:
            parse_method_spec(spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    args = TrainArgs(model=model, task=task, **settings)
    args.validate()
    loaded = load_model(model)
    data = load_task(task, text_column=args.text_column, label_column=args.label_column, seed=args.seed,
                     train_limit=args.train_limit, test_limit=args.test_limit)
    if data.kind != loaded.modality:
        raise ArgumentError(f"task {task!r} holds {data.kind} data but model {model!r} reads {loaded.modality}; "
                            f"pick a {data.kind} model")
    check_length(loaded, args.max_length)

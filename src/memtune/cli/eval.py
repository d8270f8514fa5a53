"""`memtune eval`: evaluate a saved adapter on its task (or another one) and print the metrics as JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a saved adapter")
    p.add_argument("--model", required=True)
    p.add_argument("--task", default=None, help="default: the task the adapter was trained on")
    p.add_argument("--adapter", required=True, help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--data-dir", default=None, help="folder with your GLUE / SuperGLUE / VTAB-1k copy (default: the "
                   "training run's, else $MEMTUNE_DATA_DIR)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--test-limit", type=_test_limit, default=None, metavar="N|all",
                   help="score a class-stratified subset of N test examples, or 'all' of them (default: the "
                        "training run's --test-limit)")
    p.add_argument("--ablate", choices=("image", "question"), default=None,
                   help="image-text tasks: evaluate a single-modality control, every image blanked (image) or every "
                        "question emptied (question); a model that needs both falls to chance")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=run)


def _test_limit(value: str) -> int | str:
    """--test-limit: a positive count or 'all' (the whole test split, whatever the training run scored)."""
    import argparse

    if value.strip().lower() == "all":
        return "all"
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of test examples or 'all', got {value!r}")
    return count


def _run_settings(adapter: Path) -> dict:
    """The settings of the run that trained the adapter (its metrics.json), or {} where there is none."""
    from ..checkpoint import CheckpointError

    metrics_file = adapter / "metrics.json"
    try:
        return json.loads(metrics_file.read_text(encoding="utf-8")).get("settings", {}) \
            if metrics_file.exists() else {}
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{metrics_file}: unreadable ({e}); expected the JSON file that memtune train "
                              "writes") from None


def run(ns) -> int:
    import torch

    from ..api import load
    from ..checkpoint import read_adapter_config
    from ..data import TaskError, load_task, make_collate
    from ..data.vqa_task import ablate
    from ..evaluation import evaluate
    from ..models import load_model
    from ..preflight import align_task_labels, check_batch_size, check_task_fits_model
    from ..seq2seq import model_label_targets

    check_batch_size(ns.batch_size)
    saved = read_adapter_config(ns.adapter)
    settings = _run_settings(Path(ns.adapter))
    task_name = ns.task or settings.get("task")
    if task_name is None:
        raise TaskError("--task is required: the adapter folder has no metrics.json naming its task")
    loaded = load_model(ns.model)
    model = load(loaded, ns.adapter)
    test_limit = {None: settings.get("test_limit"), "all": None}.get(ns.test_limit, ns.test_limit)
    task = load_task(task_name, seed=settings.get("seed", 0), test_limit=test_limit,
                     text_column=settings.get("text_column", "text"), label_column=settings.get("label_column", "label"),
                     data_dir=ns.data_dir or settings.get("data_dir"), regression=model.objective == "regression")
    if ns.ablate and task.kind != "image_text":
        raise TaskError(f"--ablate applies to image-text tasks (e.g. digits-vqa/B1); {task_name!r} is a "
                        f"{task.kind} task")
    if task.regression != (model.objective == "regression"):
        raise TaskError(f"task {task_name!r} is {'a regression' if task.regression else 'a classification'} task, "
                        f"the adapter's head is for {model.objective}")
    check_task_fits_model(task, task_name, loaded, model)
    note = align_task_labels(task, task_name, model)
    if note:
        print(f"memtune: {note}", file=sys.stderr)
    causal = saved.get("objective") == "causal-lm"
    collate = make_collate(task.kind, loaded.preprocessor, max_length=settings.get("max_length", 128),
                           image_size=settings.get("image_size"), causal_lm=causal,
                           regression=task.regression and not causal,
                           label_targets=model_label_targets(model, loaded.preprocessor))
    test = task.test if ns.ablate is None else ablate(task.test, ns.ablate)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = evaluate(model.to(device), test, collate, ns.batch_size, device, progress=not ns.no_progress)
    main = {} if causal else {"main_metric": task.main_metric}
    extra = {"ablate": ns.ablate} if ns.ablate else {}
    print(json.dumps({"method": saved["method"], "task": task_name, **result, **main, **extra}))
    return 0

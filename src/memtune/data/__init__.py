"""Datasets for memtune: bundled real tasks, user csv/jsonl/image folders (sentence pairs, regression), the
GLUE / SuperGLUE / VTAB-1k suites from a local copy (docs/data.md), and batch collation.

>>> task = load_task("rotten-tomatoes", train_limit=2000, test_limit=1000, seed=0)
>>> collate = make_collate(task.kind, tokenizer, max_length=64)
"""

from .base import Task, TaskError
from .collate import make_collate
from .tasks import TASKS, load_task

__all__ = ["load_task", "Task", "TaskError", "TASKS", "make_collate"]

"""The two types every loader shares: the error it raises and the task it returns."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class TaskError(ValueError):
    """Bad task name, bad user file or missing dataset.

    Subclasses ValueError so callers that already catch ValueError keep working.
    Messages always say what was wrong and what would be accepted instead.
    """


@dataclass(repr=False)
class Task:
    """A classification (or regression) task with a fixed train/test split.

    Text examples are ``{"text": str, "label": int}``, sentence pairs add ``"text_pair": str``; image examples
    are ``{"image": np.ndarray, "label": int}`` with a uint8 array of shape (H, W) for grey or (H, W, 3) for
    RGB. Labels index ``label_names``; a regression task (``regression=True``, e.g. STS-B) has float labels,
    no label names and a one-output head. ``metrics`` are the metrics reported for the task (see
    ``memtune.metrics``), the first being its main metric: what selection and the compare table use.
    """

    name: str
    kind: str  # "text" | "image" | "image_text" (an image and a question: data/vqa_task.py)
    train: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)
    # Carved from the training data when asked for (``load_task(..., val_fraction=...)``); never the test split.
    validation: list[dict] = field(default_factory=list)
    regression: bool = False
    metrics: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.metrics:
            self.metrics = ("pearson", "spearman") if self.regression else ("accuracy",)

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def num_labels(self) -> int:
        """Outputs of the head: one per class, or 1 for regression."""
        return 1 if self.regression else len(self.label_names)

    def label_counts(self, split: str = "train") -> dict[str, int]:
        """Examples per class name in ``split`` ("train", "validation" or "test")."""
        if split not in ("train", "validation", "test"):
            raise TaskError(f"split must be 'train', 'validation' or 'test', got {split!r}")
        if self.regression:
            raise TaskError(f"{self.name} is a regression task: its labels are numbers, not classes")
        counts = Counter(ex["label"] for ex in getattr(self, split))
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}

    # The default dataclass repr would print every example (60k images for
    # Fashion-MNIST), so show a summary instead.
    def __repr__(self) -> str:
        return (
            f"Task(name={self.name!r}, kind={self.kind!r}, train={len(self.train)}, "
            f"validation={len(self.validation)}, test={len(self.test)}, "
            + ("regression=True)" if self.regression else f"label_names={self.label_names!r})")
        )

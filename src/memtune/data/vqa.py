"""Offline templated VQA on local images: the task the vision-and-language forms (LST-VL, SHERL-VL) are
checked on, where neither the image nor the question alone suffices.

Two generated tasks, each a set of question templates over a bundled image set:

    task = load_vqa_task("digits-vqa", seed=0)            # B1-B5 and the controls C1, C2
    task = load_vqa_task("fashion-vqa/B5", size=32)       # one template; smaller images
    ex = task.train[0]; ex.question, ex.answer, ex.image  # image: float 3×S×S in [0, 1]

and a user format, ``load_vqa_file(path)`` for CSV/JSONL rows ``image, question, answer[, image2][, split]``.
Training reads them as Tasks (``vqa_task.py``): ``load_task("digits-vqa/B5")`` or ``load_task("vqa:PATH")``;
two-image examples (B5, a file with image2) train as 2V visual tokens with image ids [0]×V + [1]×V.

**Templates** (answers are short text; B* need both modalities, C* are controls; the rates are the Bayes
accuracies of a question-only / an image-only predictor):

- B1 "is this a {c}?" -> yes / no: 0.5 / 0.5
- B2 "is it a {a} or a {b}?" -> first / second: 0.5 / 0.5
- B3 "is it {attribute}?" over 5/5 class splits, each with its complement wording -> yes / no: 0.5 / 0.5
- B4 (digits only) "what is this digit plus {n}?", n in 0..9 -> "0".."18": 0.1 / 0.1
- B5 two images, "are both the same kind of item?" / "are the two items different?" (digits: "... digit?",
  "... digits ...") -> true / false: 0.5 / 0.5
- C1 "what is this?" -> the class name: 0.1 / 1.0
- C2 "which class comes after {c} in the list?" -> the next class name (cyclic): 1.0 / 0.1

**The rule**: for every question string, P(answer | question) is uniform over that question's
answers, and for every image class (B5: class pair), P(answer | class) is uniform. The generator makes this
hold *in the sample*, not only in expectation: examples are built in small balanced units (a "quad" of four
questions for B1, B2, B3, B5; all 100 (class, n) pairs for B4 and C2; one image per class for C1), each of
which has every answer equally often for each of its question strings and each of its classes. A predictor
that sees only the question, or only the class(es), therefore scores the chance rate on the training set
itself; when the count is not a multiple of the unit U, the cut-off examples raise it by at most
chance·(U-1)/count. With independent draws
instead, the in-sample majority answer of a question string seen g times beats chance by about
sqrt(g / 2π) / g, which at B2's 90 question strings and 2,000 examples is about 8 points.

Each unit keeps the template's stated distribution: for B1, the asked class is the true one with probability
½ and otherwise uniform over the other classes; for B2, one option is true and the order is random; for B3,
a split is drawn, then one class on each side; for B5, the pair is same-class with probability ½ (two
different images of the class) and different-class otherwise.

**Sources** are memtune's bundled readers (``bundled.fashion_mnist``: Debian ``dataset-fashion-mnist``,
60,000 / 10,000; ``bundled.digits``: scikit-learn's fixed 1,438 / 359 split), training questions use only
the source's train split and test questions only its test split. Images are kept as the source's uint8
arrays and converted on access (upsampled bilinearly to 56² for digits, 112² for Fashion-MNIST, grey repeated
to 3 channels): 2,000 × 7 templates of 3×112×112 float images would take over 2 GB if stored.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import bundled
from .base import TaskError
from .collate import DEFAULT_IMAGE_SIZE, _as_hwc, _to_rgb
from .image_folder import _read_image
from .splits import stratified_split
from .user_files import SPLIT_COLUMN, SPLIT_VALUES, json_objects, read_utf8

__all__ = [
    "VQAExample", "VQATask", "VQAOptions", "VQA_TASKS", "TEMPLATE_IDS", "load_vqa_task", "load_vqa_file",
    "image_batch", "B3_SPLITS",
]

TEMPLATE_IDS = ("B1", "B2", "B3", "B4", "B5", "C1", "C2")
USER_TEMPLATE = "file"  # template id of every example read by load_vqa_file
USER_VQA_SPLIT_SALT = "memtune-vqa-user-split-v1"
YES_NO = ("yes", "no")
FIRST_SECOND = ("first", "second")
TRUE_FALSE = ("true", "false")
B4_ANSWERS = tuple(str(i) for i in range(19))  # digit 0..9 plus n 0..9


# ------------------------------------------------------------------------------------------- examples
@dataclass(frozen=True, eq=False)
class VQAExample:
    """One question about one image (two for B5 and two-image user rows).

    ``pixels`` are the source's uint8 arrays, (H, W) grey or (H, W, 3) RGB, shared and read-only;
    ``images`` converts them on each access to float32 tensors 3×size×size in [0, 1] (not normalised:
    the vision encoder's own mean/std apply later). ``classes`` are the source class ids of the images and
    ``source`` their positions in the source split named by ``split``; both are () for user files.
    """

    question: str
    answer: str
    template: str
    pixels: tuple[np.ndarray, ...]
    size: int
    split: str
    classes: tuple[int, ...] = ()
    source: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.pixels) not in (1, 2):
            raise TaskError(f"a VQA example has 1 or 2 images, got {len(self.pixels)}")
        for what, ids in (("classes", self.classes), ("source", self.source)):
            if ids and len(ids) != len(self.pixels):
                raise TaskError(f"VQA example {what} {ids} does not give one entry per image "
                                f"({len(self.pixels)} images)")

    @property
    def num_images(self) -> int:
        return len(self.pixels)

    @property
    def images(self) -> tuple[torch.Tensor, ...]:
        """One float32 tensor 3×S×S in [0, 1] per image."""
        return tuple(to_image_tensor(p, self.size) for p in self.pixels)

    @property
    def image(self) -> torch.Tensor:
        return to_image_tensor(self.pixels[0], self.size)

    @property
    def image2(self) -> torch.Tensor | None:
        return to_image_tensor(self.pixels[1], self.size) if len(self.pixels) == 2 else None


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """B×3×H×W -> B×3×size×size, as the image collator resizes (antialias only matters when shrinking)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def to_image_tensor(pixels: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (H, W) / (H, W, C) -> float32 3×size×size in [0, 1]; grey is repeated to three channels."""
    x = _resize(_to_rgb(np.stack([_as_hwc(pixels)])), size)  # 1×3×S×S in 0..255
    return (x[0] / 255.0).clamp_(0.0, 1.0)  # bilinear overshoot stays in range


def image_batch(examples: Sequence[VQAExample], slot: int = 0) -> torch.Tensor:
    """B×3×S×S float32 of image ``slot`` (0, or 1 for the second image) of each example, resized in one call
    when the sources share a shape (the generated tasks always do)."""
    if not examples:
        raise TaskError("image_batch needs at least one example")
    if slot not in (0, 1):
        raise TaskError(f"image_batch slot must be 0 or 1, got {slot!r}")
    sizes = {ex.size for ex in examples}
    if len(sizes) != 1:
        raise TaskError(f"image_batch: the examples have different image sizes {sorted(sizes)}")
    missing = [i for i, ex in enumerate(examples) if ex.num_images <= slot]
    if missing:
        raise TaskError(f"image_batch slot {slot}: examples {missing[:5]} have only one image")
    size = sizes.pop()
    arrays = [_as_hwc(ex.pixels[slot]) for ex in examples]
    if len({a.shape for a in arrays}) == 1:
        x = _resize(_to_rgb(np.stack(arrays)), size)
    else:
        x = torch.cat([_resize(_to_rgb(np.stack([a])), size) for a in arrays])
    return (x / 255.0).clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------------------------- task
@dataclass(repr=False)
class VQATask:
    """Generated (or user) VQA data. ``train`` / ``test`` hold the templates one after another.

    ``answers[t]`` is template t's answer vocabulary; ``chance[t]`` the chance rate of its answer
    distribution: the share of its most frequent answer, which for B1-B5 is also the Bayes accuracy of a
    question-only and of an image-only predictor (for user files: measured on the training split).
    """

    name: str
    templates: tuple[str, ...]
    train: list[VQAExample]
    test: list[VQAExample]
    answers: dict[str, tuple[str, ...]]
    chance: dict[str, float]
    image_size: int
    source: str = ""
    seed: int | None = None
    descriptions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for what, table in (("answers", self.answers), ("chance", self.chance)):
            if set(table) != set(self.templates):
                raise TaskError(f"VQATask {self.name}: {what} covers templates {sorted(table)}, "
                                f"expected {list(self.templates)}")

    def examples(self, template: str, split: str = "train") -> list[VQAExample]:
        if split not in ("train", "test"):
            raise TaskError(f"split must be 'train' or 'test', got {split!r}")
        if template not in self.templates:
            raise TaskError(f"{self.name} has no template {template!r}; it has {list(self.templates)}")
        return [ex for ex in getattr(self, split) if ex.template == template]

    def describe(self) -> str:
        """A table of the templates: images per question, counts, answer vocabulary, chance, a question."""
        lines = [f"{self.name}: {self.source}" if self.source else self.name,
                 f"images 3x{self.image_size}x{self.image_size}, train {len(self.train)}, test {len(self.test)}"
                 + (f", seed {self.seed}" if self.seed is not None else "")]
        train_counts = Counter(ex.template for ex in self.train)
        test_counts = Counter(ex.template for ex in self.test)
        first = {}
        for ex in self.train:
            first.setdefault(ex.template, ex)
        lines.append(f"{'template':<9}{'images':>7}{'train':>7}{'test':>6}{'answers':>9}{'chance':>8}  question")
        for t in self.templates:
            ex = first.get(t)
            lines.append(f"{t:<9}{ex.num_images if ex else 0:>7}{train_counts[t]:>7}{test_counts[t]:>6}"
                         f"{len(self.answers[t]):>9}{self.chance[t]:>8.2f}  "
                         + (f"{ex.question!r} -> {ex.answer!r}" if ex else "(no examples)"))
            if t in self.descriptions:
                lines.append(f"{'':<9}{self.descriptions[t]}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"VQATask(name={self.name!r}, templates={self.templates}, train={len(self.train)}, "
                f"test={len(self.test)}, image_size={self.image_size})")


@dataclass(frozen=True)
class VQAOptions:
    """Generation settings, checked at construction. ``size`` None: the dataset's default (56 or 112)."""

    seed: int = 0
    train_per_template: int = 2000
    test_per_template: int = 500
    size: int | None = None

    def __post_init__(self):
        for name in ("seed", "train_per_template", "test_per_template", "size"):
            value = getattr(self, name)
            if name == "size" and value is None:
                continue
            low = 0 if name == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                allowed = "a non-negative integer" if name == "seed" else "a positive integer"
                raise TaskError(f"VQA option {name} must be {allowed}"
                                + (" or None" if name == "size" else "") + f", got {value!r}")


# --------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class _Source:
    """What a generated task needs from its image set: words for the classes and the reader."""

    task: str
    words: tuple[str, ...]  # class id -> the word used in questions and answers
    b5_questions: tuple[str, str]  # B5's two wordings: (true when same class, true when different)
    templates: tuple[str, ...]
    default_size: int
    reader: Callable[[], tuple]  # -> (train, test, label names), bundled's reader
    description: str


# B3's binary attribute splits: (classes for which the first wording is true, first wording, complement
# wording). Every split is 5/5, so over a split's two wordings every class is "yes" exactly once.
# Fashion-MNIST ids: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal, 6 Shirt, 7 Sneaker,
# 8 Bag, 9 Ankle boot.
B3_SPLITS: dict[str, tuple[tuple[frozenset[int], str, str], ...]] = {
    "fashion-vqa": (
        (frozenset({0, 2, 3, 4, 6}), "worn above the waist", "not worn above the waist"),
        (frozenset({1, 3, 5, 7, 9}), "worn below the waist", "not worn below the waist"),
        (frozenset({0, 1, 2, 3, 6}), "made of soft cloth", "made of sturdy material"),
        (frozenset({1, 4, 6, 7, 9}), "fastened with buttons or laces", "without buttons or laces"),
    ),
    "digits-vqa": (
        (frozenset({0, 2, 4, 6, 8}), "an even digit", "an odd digit"),
        (frozenset({0, 1, 2, 3, 4}), "less than five", "five or more"),
    ),
}

_SOURCES = {
    "fashion-vqa": _Source(
        task="fashion-vqa", words=tuple(name.lower() for name in bundled.FASHION_MNIST_LABELS),
        b5_questions=("are both the same kind of item?", "are the two items different?"),
        templates=("B1", "B2", "B3", "B5", "C1", "C2"), default_size=112, reader=bundled.fashion_mnist,
        description="templated VQA on Fashion-MNIST (Debian dataset-fashion-mnist), 28x28 grey upsampled"),
    "digits-vqa": _Source(
        task="digits-vqa", words=tuple(str(d) for d in range(10)),
        b5_questions=("are both the same digit?", "are the two digits different?"),
        templates=TEMPLATE_IDS, default_size=56, reader=bundled.digits,
        description="templated VQA on scikit-learn's 8x8 digits, upsampled"),
}

VQA_TASKS: dict[str, str] = {name: src.description + f"; templates {', '.join(src.templates)}"
                             for name, src in _SOURCES.items()}


# ------------------------------------------------------------------------------------------- templates
# A unit is a list of (question, answer, class ids of the images); see the module docstring for why units.
Unit = list[tuple[str, str, tuple[int, ...]]]


def _a(word: str) -> str:
    """The word with its indefinite article ("a coat", "an ankle boot", "an 8")."""
    return f"{'an' if word[0] in 'aeiou8' else 'a'} {word}"


def _distinct_pair(rng: np.random.Generator, k: int) -> tuple[int, int]:
    """An ordered pair of different classes, uniform over the k·(k-1) pairs."""
    a, b = rng.choice(k, size=2, replace=False)
    return int(a), int(b)


def _unit_b1(rng, src: _Source) -> Unit:
    # Classes y ≠ z: each question "is this a y?" / "... a z?" gets one yes and one no, each class too.
    y, z = _distinct_pair(rng, len(src.words))
    q = lambda c: f"is this {_a(src.words[c])}?"  # noqa: E731
    return [(q(y), "yes", (y,)), (q(y), "no", (z,)), (q(z), "yes", (z,)), (q(z), "no", (y,))]


def _unit_b2(rng, src: _Source) -> Unit:
    # Both orders of the option pair {a, b}, each with a as the image and with b as the image.
    a, b = _distinct_pair(rng, len(src.words))
    q = lambda x, y: f"is it {_a(src.words[x])} or {_a(src.words[y])}?"  # noqa: E731
    return [(q(a, b), "first", (a,)), (q(a, b), "second", (b,)),
            (q(b, a), "second", (a,)), (q(b, a), "first", (b,))]


def _unit_b3(rng, src: _Source) -> Unit:
    # One class inside the split, one outside, each asked with both wordings.
    members, yes_words, no_words = B3_SPLITS[src.task][int(rng.integers(len(B3_SPLITS[src.task])))]
    inside = sorted(members)
    outside = sorted(set(range(len(src.words))) - members)
    a, b = inside[int(rng.integers(len(inside)))], outside[int(rng.integers(len(outside)))]
    q = lambda words: f"is it {words}?"  # noqa: E731
    return [(q(yes_words), "yes", (a,)), (q(yes_words), "no", (b,)),
            (q(no_words), "no", (a,)), (q(no_words), "yes", (b,))]


def _unit_b4(rng, src: _Source) -> Unit:
    # Every (digit, n) pair once: each question n has answers n..n+9 once, each digit d has d..d+9 once.
    return [(f"what is this digit plus {n}?", str(d + n), (d,)) for d in range(10) for n in range(10)]


def _unit_b5(rng, src: _Source) -> Unit:
    # A same pair (a, a) and a different pair (a, b) in random order, each under both wordings.
    a, b = _distinct_pair(rng, len(src.words))
    different = (a, b) if rng.integers(2) else (b, a)
    same_q, diff_q = src.b5_questions
    return [(same_q, "true", (a, a)), (diff_q, "false", (a, a)),
            (same_q, "false", different), (diff_q, "true", different)]


def _unit_c1(rng, src: _Source) -> Unit:
    return [("what is this?", word, (y,)) for y, word in enumerate(src.words)]


def _unit_c2(rng, src: _Source) -> Unit:
    # The answer follows from the question alone; the image class runs over every class for each question.
    k = len(src.words)
    return [(f"which class comes after {src.words[c]} in the list?", src.words[(c + 1) % k], (y,))
            for c in range(k) for y in range(k)]


@dataclass(frozen=True)
class _Template:
    id: str
    images: int
    unit: Callable[[np.random.Generator, _Source], Unit]
    answers: Callable[[_Source], tuple[str, ...]]
    chance: Callable[[_Source], float]
    description: str


_TEMPLATES = {t.id: t for t in (
    _Template("B1", 1, _unit_b1, lambda s: YES_NO, lambda s: 0.5,
              "is this a {c}? (yes/no); c is the true class with probability 1/2"),
    _Template("B2", 1, _unit_b2, lambda s: FIRST_SECOND, lambda s: 0.5,
              "is it a {a} or a {b}? (first/second); one option true, random order"),
    _Template("B3", 1, _unit_b3, lambda s: YES_NO, lambda s: 0.5,
              "is it {attribute}? (yes/no); 5/5 class splits, each with its complement wording"),
    # "9" is the most frequent sum: 10 of the 100 (digit, n) pairs.
    _Template("B4", 1, _unit_b4, lambda s: B4_ANSWERS, lambda s: 0.1,
              "what is this digit plus {n}? (0..18); n in 0..9"),
    _Template("B5", 2, _unit_b5, lambda s: TRUE_FALSE, lambda s: 0.5,
              "two images: are both the same ...? / are the two ... different? (true/false); same w.p. 1/2"),
    _Template("C1", 1, _unit_c1, lambda s: s.words, lambda s: 1 / len(s.words),
              "control, image alone suffices: what is this? (class name)"),
    _Template("C2", 1, _unit_c2, lambda s: s.words, lambda s: 1 / len(s.words),
              "control, text alone suffices: which class comes after {c} in the list? (class name)"),
)}


# ------------------------------------------------------------------------------------------ generation
class _ClassCycler:
    """Source positions per class, drawn without replacement and reshuffled once a class is used up, so a
    small split (digits: about 36 test images per class) is covered evenly."""

    def __init__(self, labels: Sequence[int], num_classes: int, rng: np.random.Generator):
        self.rng = rng
        by_class = [[] for _ in range(num_classes)]
        for i, y in enumerate(labels):
            by_class[y].append(i)
        empty = [y for y, idx in enumerate(by_class) if len(idx) < 2]
        if empty:
            raise TaskError(f"VQA generation needs at least 2 source images of every class; "
                            f"classes {empty} have fewer")
        self.by_class = [np.asarray(idx) for idx in by_class]
        self.order = [rng.permutation(idx) for idx in self.by_class]
        self.next = [0] * num_classes

    def draw(self, y: int, avoid: int | None = None) -> int:
        while True:
            if self.next[y] == len(self.order[y]):
                self.order[y], self.next[y] = self.rng.permutation(self.by_class[y]), 0
            i = int(self.order[y][self.next[y]])
            self.next[y] += 1
            if i != avoid:  # a same-class B5 pair shows two different images
                return i


def _generate(src: _Source, template: _Template, source_split: tuple, split: str, count: int,
              options: VQAOptions, size: int) -> list[VQAExample]:
    """`count` examples of one template from one source split; the random stream is fixed by
    (seed, task, template, split), so a template's examples do not depend on which others are generated."""
    stream = [options.seed, list(_SOURCES).index(src.task), TEMPLATE_IDS.index(template.id),
              ("train", "test").index(split)]
    rng = np.random.default_rng(stream)
    rows: Unit = []
    while len(rows) < count:
        rows.extend(template.unit(rng, src))
    rows = [rows[i] for i in rng.permutation(len(rows))[:count]]
    cycler = _ClassCycler([ex["label"] for ex in source_split], len(src.words), rng)
    out = []
    for question, answer, classes in rows:
        first = cycler.draw(classes[0])
        positions = (first,) if len(classes) == 1 else (first, cycler.draw(classes[1], avoid=first))
        out.append(VQAExample(question=question, answer=answer, template=template.id,
                              pixels=tuple(source_split[i]["image"] for i in positions), size=size,
                              split=split, classes=tuple(classes), source=positions))
    return out


def _parse_name(name) -> tuple[_Source, tuple[str, ...]]:
    if not isinstance(name, str):
        raise TaskError(f"VQA task name must be a string, got {type(name).__name__}")
    base, _, template = name.strip().partition("/")
    src = _SOURCES.get(base.lower())
    if src is None:
        raise TaskError(f"unknown VQA task {name!r}; use one of {sorted(_SOURCES)}, optionally with "
                        f"'/<template>' (e.g. 'fashion-vqa/B1'), or load_vqa_file for a CSV/JSONL file")
    if not template:
        return src, src.templates
    template = template.strip().upper()
    if template not in src.templates:
        why = " (B4 is digits only)" if template == "B4" else ""
        raise TaskError(f"VQA task {name!r}: template {template!r} is not one of {src.task}'s "
                        f"{list(src.templates)}{why}")
    return src, (template,)


def load_vqa_task(name: str, *, seed: int = 0, train_per_template: int = 2000, test_per_template: int = 500,
                  size: int | None = None) -> VQATask:
    """Generate ``fashion-vqa`` or ``digits-vqa`` (all its templates) or ``<task>/<template>`` (one).

    Training questions come from the source's train split, test questions from its test split. The same
    arguments give the same examples. ``size`` overrides the image side (default 112 / 56).
    """
    src, templates = _parse_name(name)
    options = VQAOptions(seed=seed, train_per_template=train_per_template,
                         test_per_template=test_per_template, size=size)
    image_size = int(options.size or src.default_size)
    train_split, test_split, _ = src.reader()  # TaskError with the install command when missing
    train, test = [], []
    for t in templates:
        template = _TEMPLATES[t]
        train += _generate(src, template, train_split, "train", options.train_per_template, options, image_size)
        test += _generate(src, template, test_split, "test", options.test_per_template, options, image_size)
    return VQATask(
        name=name.strip().lower() if len(templates) > 1 else f"{src.task}/{templates[0]}",
        templates=templates, train=train, test=test,
        answers={t: tuple(_TEMPLATES[t].answers(src)) for t in templates},
        chance={t: float(_TEMPLATES[t].chance(src)) for t in templates},
        image_size=image_size, source=src.description, seed=options.seed,
        descriptions={t: _TEMPLATES[t].description for t in templates},
    )


# ------------------------------------------------------------------------------------------ user files
USER_COLUMNS = ("image", "question", "answer")
USER_OPTIONAL = ("image2", SPLIT_COLUMN)


def _user_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a CSV (with a header) or JSONL file; missing columns are named."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise TaskError(f"VQA file {path}: suffix {path.suffix or '(none)'!r} is not one of '.csv', '.jsonl'")
    raw = read_utf8(path, "VQA " + suffix[1:].upper())
    rows = []
    if suffix == ".csv":
        reader = csv.reader(io.StringIO(raw, newline=""), strict=True)
        try:
            header = [c.strip() for c in next(reader)]
            missing = [c for c in USER_COLUMNS if c not in header]
            if missing:
                raise TaskError(f"{path}: column(s) {missing} not found; columns found: {header} (a VQA file "
                                f"needs {list(USER_COLUMNS)}, optionally {list(USER_OPTIONAL)})")
            start = reader.line_num + 1
            for record in reader:
                line, start = start, reader.line_num + 1
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue  # blank line
                if len(record) != len(header):
                    raise TaskError(f"{path}: malformed CSV at line {line}: {len(record)} fields, "
                                    f"header has {len(header)}")
                rows.append((line, dict(zip(header, record))))
        except csv.Error as err:
            raise TaskError(f"{path}: malformed CSV at line {reader.line_num}: {err}") from None
    else:
        example = '{"image": "cat.png", "question": "...", "answer": "..."}'
        for line, obj in json_objects(raw, path, example):
            missing = [c for c in USER_COLUMNS if c not in obj]
            if missing:
                raise TaskError(f"{path}: line {line} has no field(s) {missing}; fields found: {sorted(obj)} "
                                f"(a VQA row needs {list(USER_COLUMNS)}, optionally {list(USER_OPTIONAL)})")
            rows.append((line, obj))
    if not rows:
        raise TaskError(f"VQA file has no data rows: {path}")
    return rows


def _text_cell(path: Path, line: int, row: dict, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise TaskError(f"{path}: line {line}, column {column!r}: expected a string, got {value!r}")
    if not value.strip():
        raise TaskError(f"{path}: line {line}, column {column!r} is empty")
    return value.strip()


def load_vqa_file(path, *, size: int = DEFAULT_IMAGE_SIZE) -> VQATask:
    """Read a user VQA file: CSV (header) or JSONL rows with ``image`` (path relative to the file),
    ``question``, ``answer``, optionally ``image2`` (then every row needs it) and ``split`` (train/test;
    without it a fixed 80/20 split stratified by answer). Images are decoded at load, so a bad row fails
    here, naming its line and column; ``size`` is the side of the 3×S×S tensors."""
    VQAOptions(size=size)  # the same check as for generated tasks
    path = Path(path).expanduser()
    rows = _user_rows(path)
    two = any(str(row.get("image2") or "").strip() for _, row in rows)
    columns = ("image", "image2") if two else ("image",)
    decoded: dict[Path, np.ndarray] = {}  # an image asked about in many rows is read once
    examples, splits = [], []
    for line, row in rows:
        pixels = []
        for column in columns:
            if two and not str(row.get(column) or "").strip():
                raise TaskError(f"{path}: line {line}, column {column!r} is empty; rows of a file with "
                                "image2 need two images (put one-image questions in another file)")
            image_path = path.parent / _text_cell(path, line, row, column)
            if image_path not in decoded:
                if not image_path.is_file():
                    raise TaskError(f"{path}: line {line}, column {column!r}: image file not found: {image_path}")
                try:
                    decoded[image_path] = _read_image(image_path)
                except TaskError as err:
                    raise TaskError(f"{path}: line {line}, column {column!r}: {err}") from None
            pixels.append(decoded[image_path])
        split = row.get(SPLIT_COLUMN)
        if split is not None:
            split = str(split).strip().lower()
            if split not in SPLIT_VALUES:
                raise TaskError(f"{path}: line {line}, column {SPLIT_COLUMN!r}: {row.get(SPLIT_COLUMN)!r} is "
                                f"not one of {list(SPLIT_VALUES)}")
        splits.append(split)
        examples.append((_text_cell(path, line, row, "question"), _text_cell(path, line, row, "answer"),
                         tuple(pixels)))
    if any(s is not None for s in splits):
        if any(s is None for s in splits):
            raise TaskError(f"{path}: some rows have a {SPLIT_COLUMN!r} value and some do not; give it on "
                            "every row or on none")
        train_idx = [i for i, s in enumerate(splits) if s == "train"]
        test_idx = [i for i, s in enumerate(splits) if s == "test"]
    else:
        answers = sorted({a for _, a, _ in examples})
        train_idx, test_idx = stratified_split([answers.index(a) for _, a, _ in examples],
                                               salt=USER_VQA_SPLIT_SALT)
    if not train_idx or not test_idx:
        raise TaskError(f"{path}: the split leaves no {'train' if not train_idx else 'test'} rows "
                        f"({len(rows)} rows in all)")
    def make(indices: list[int], split: str) -> list[VQAExample]:
        return [VQAExample(question=q, answer=a, template=USER_TEMPLATE, pixels=p, size=size, split=split)
                for q, a, p in (examples[i] for i in indices)]

    train, test = make(train_idx, "train"), make(test_idx, "test")
    counts = Counter(ex.answer for ex in train)
    return VQATask(name=str(path), templates=(USER_TEMPLATE,), train=train, test=test,
                   answers={USER_TEMPLATE: tuple(sorted({a for _, a, _ in examples}))},
                   chance={USER_TEMPLATE: max(counts.values()) / len(train)}, image_size=size,
                   source=f"user VQA file, {len(rows)} rows")

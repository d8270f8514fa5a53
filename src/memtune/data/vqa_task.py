"""The generated VQA tasks (`vqa.py`) as memtune Tasks of kind "image_text", for `load_task` and training.

    task = load_task("digits-vqa/B1", seed=0, train_limit=200)   # Task(kind="image_text", label_names=[yes, no])
    ex = task.train[0]    # {"text": question, "image": uint8 (H, W), "label": answer id, "template": "B1"}

- **Classes are the answers**: `label_names` is the answer vocabulary of the task's templates in template order
  (a template-set task such as "digits-vqa" joins them, each answer once), `label` indexes it. Text-to-text
  training (`--objective seq2seq`) generates the answer words through the existing label-word path.
- **The data never depends on the seed**, as for the bundled tasks: the questions are generated once with the
  generator's seed 0 and its default counts (2,000 train / 500 test per template); `seed`, `train_limit` and
  `test_limit` then pick class-stratified subsets in `load_task`, as for every task.
- **Images** are the source's uint8 arrays (8×8 digits, 28×28 Fashion-MNIST); the image collator resizes them
  to the vision model's size and normalises them with its mean/std, as it does an image task's.
- **B5 (two images) is refused** when named, and left out of the template-set names: the compositions read
  one image per example (72 visual tokens with image ids are not wired into the prefix or the side yet).
"""
from __future__ import annotations

from .base import Task, TaskError
from .vqa import VQA_TASKS, load_vqa_task

# Templates with two images per example: not trainable yet (see the module docstring).
TWO_IMAGE_TEMPLATES = ("B5",)
GENERATOR_SEED = 0       # the questions are fixed; the run's seed picks subsets (`load_task`)


def is_vqa_name(key: str) -> bool:
    """True for "fashion-vqa", "digits-vqa" and "<either>/<template>" (lower-cased, stripped)."""
    return key.partition("/")[0] in VQA_TASKS


def vqa_task_names() -> list[str]:
    return sorted(VQA_TASKS)


def load_vqa_as_task(key: str) -> Task:
    """The whole generated task `key` (limits and seeded subsets are `load_task`'s job)."""
    base, _, template = key.partition("/")
    if template.strip().upper() in TWO_IMAGE_TEMPLATES:
        raise TaskError(f"VQA task {key!r}: template {template.strip().upper()} has two images per example, which "
                        "training does not support yet; use one of the one-image templates B1, B2, B3, B4 "
                        "(digits only), C1, C2")
    vqa = load_vqa_task(key, seed=GENERATOR_SEED)
    templates = [t for t in vqa.templates if t not in TWO_IMAGE_TEMPLATES]
    answers: list[str] = []
    for t in templates:
        answers += [a for a in vqa.answers[t] if a not in answers]
    index = {a: i for i, a in enumerate(answers)}

    def examples(split) -> list[dict]:
        return [{"text": ex.question, "image": ex.pixels[0], "label": index[ex.answer], "template": ex.template}
                for ex in split if ex.template in templates]

    name = base if not template else vqa.name
    return Task(name=name, kind="image_text", train=examples(vqa.train), test=examples(vqa.test),
                label_names=answers)


ABLATIONS = ("image", "question")


def ablate(examples: list[dict], what: str) -> list[dict]:
    """Single-modality controls (docs/methods/vl.md §5.11): copies of image-text `examples` with one modality
    removed. "image": every image becomes a blank (all-zero) array of its shape, so the visual tokens are one
    constant for the whole split; "question": every text becomes "", so the text backbone sees only its special
    tokens. A model that needs both modalities falls to the template's chance rate under either."""
    if what not in ABLATIONS:
        raise TaskError(f"ablation {what!r} is not one of {', '.join(ABLATIONS)}")
    if what == "image":
        return [{**ex, "image": ex["image"] * 0} for ex in examples]
    return [{**ex, "text": ""} for ex in examples]

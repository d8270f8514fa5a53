"""The generated VQA tasks (`vqa.py`) and user VQA files as memtune Tasks of kind "image_text", for `load_task`
and training.

    task = load_task("digits-vqa/B1", seed=0, train_limit=200)   # Task(kind="image_text", label_names=[yes, no])
    ex = task.train[0]    # {"text": question, "image": uint8 (H, W), "label": answer id, "template": "B1"}
    task = load_task("digits-vqa/B5")      # two images: examples also carry "image2" (uint8 (H, W))
    task = load_task("vqa:questions.csv")  # a user file (vqa.py load_vqa_file): image, question, answer[, image2]

- **Classes are the answers**: `label_names` is the answer vocabulary of the task's templates in template order
  (a template-set task such as "digits-vqa" joins them, each answer once; a user file: its answers sorted),
  `label` indexes it. Text-to-text training (`--objective seq2seq`) generates the answer words through the
  existing label-word path.
- **The data never depends on the seed**, as for the bundled tasks: the questions are generated once with the
  generator's seed 0 and its default counts (2,000 train / 500 test per template); `seed`, `train_limit` and
  `test_limit` then pick class-stratified subsets in `load_task`, as for every task.
- **Images** are the source's uint8 arrays (8×8 digits, 28×28 Fashion-MNIST); the image collator resizes them
  to the vision model's size and normalises them with its mean/std, as it does an image task's.
- **Two images** (B5, NLVR²-style, and user files with an image2 column): the second image is "image2"; the
  collator makes it pixel_values_2 and the composition gives 2V visual tokens with image ids [0]×V + [1]×V
  (`backbones/image_text.py`). B5 trains when named (`digits-vqa/B5`, `fashion-vqa/B5`). The template-set names
  ("digits-vqa", "fashion-vqa") leave it out, by choice: their batches would mix one- and two-image examples,
  which the collator refuses (one visual length per batch), and B5's answers (true/false) would join the
  vocabulary of the one-image templates.
"""
from __future__ import annotations

from pathlib import Path

from .base import Task, TaskError
from .vqa import VQA_TASKS, VQATask, load_vqa_file, load_vqa_task

# Templates with two images per example: trainable when named, left out of the template-set names (module docstring).
TWO_IMAGE_TEMPLATES = ("B5",)
GENERATOR_SEED = 0       # the questions are fixed; the run's seed picks subsets (`load_task`)
USER_PREFIX = "vqa:"     # "vqa:PATH": a user VQA file (CSV or JSONL, vqa.py load_vqa_file)


def is_vqa_name(key: str) -> bool:
    """True for "fashion-vqa", "digits-vqa", "<either>/<template>" and "vqa:PATH" (lower-cased, stripped)."""
    return key.partition("/")[0] in VQA_TASKS or key.startswith(USER_PREFIX)


def vqa_task_names() -> list[str]:
    return sorted(VQA_TASKS)


def load_vqa_as_task(name: str) -> Task:
    """The whole generated task `name`, or the user file of "vqa:PATH" (the path keeps its case); limits and
    seeded subsets are `load_task`'s job."""
    name = name.strip()
    if name.lower().startswith(USER_PREFIX):
        path = name[len(USER_PREFIX):].strip()
        if not path:
            raise TaskError(f"{name!r}: give a file path after '{USER_PREFIX}', e.g. '{USER_PREFIX}questions.csv'")
        vqa = load_vqa_file(Path(path).expanduser())
        return vqa_as_task(vqa, name, list(vqa.templates))
    key = name.lower()
    base, _, template = key.partition("/")
    vqa = load_vqa_task(key, seed=GENERATOR_SEED)
    if template:
        templates = list(vqa.templates)                        # the one named, B5 included
    else:
        templates = [t for t in vqa.templates if t not in TWO_IMAGE_TEMPLATES]
    return vqa_as_task(vqa, base if not template else vqa.name, templates)


def vqa_as_task(vqa: VQATask, name: str, templates: list[str]) -> Task:
    """A VQATask's examples of `templates` as a Task: one class per answer (in template order, each once).
    Every example of the task must have the same number of images (one visual length per batch)."""
    answers: list[str] = []
    for t in templates:
        answers += [a for a in vqa.answers[t] if a not in answers]
    index = {a: i for i, a in enumerate(answers)}

    def example(ex) -> dict:
        out = {"text": ex.question, "image": ex.pixels[0], "label": index[ex.answer], "template": ex.template}
        if ex.num_images == 2:
            out["image2"] = ex.pixels[1]                        # the second image: pixel_values_2
        return out

    def examples(split) -> list[dict]:
        return [example(ex) for ex in split if ex.template in templates]

    train, test = examples(vqa.train), examples(vqa.test)
    if len({"image2" in ex for ex in train + test}) > 1:
        raise TaskError(f"VQA task {name!r} mixes one-image and two-image examples; a task must be all one or "
                        "the other (train two-image templates such as B5 on their own)")
    return Task(name=name, kind="image_text", train=train, test=test, label_names=answers)


ABLATIONS = ("image", "question")


def ablate(examples: list[dict], what: str) -> list[dict]:
    """Single-modality controls (docs/methods/vl.md §5.11): copies of image-text `examples` with one modality
    removed. "image": every image (and a two-image example's "image2") becomes a blank (all-zero) array of its
    shape, so the visual tokens are one constant for the whole split; "question": every text becomes "", so the
    text backbone sees only its special tokens. A model that needs both modalities falls to the template's
    chance rate under either."""
    if what not in ABLATIONS:
        raise TaskError(f"ablation {what!r} is not one of {', '.join(ABLATIONS)}")
    if what == "image":                        # both images of a two-image example
        return [{**ex, **{k: ex[k] * 0 for k in ("image", "image2") if k in ex}} for ex in examples]
    return [{**ex, "text": ""} for ex in examples]

"""Collation of image + question examples (task kind "image_text", e.g. the VQA tasks of `vqa_task.py`).

    pre = ImageTextProcessor(tokenizer, image_processor)      # what `load_model` gives an image-text composition
    collate = make_collate("image_text", pre, max_length=32)  # or a bare tokenizer plus image_size=...
    batch = collate(examples)     # input_ids, attention_mask B×L (the question), pixel_values B×3×S×S, labels
                                  # + pixel_values_2 B×3×S×S when the examples have a second image ("image2")

The question goes through the text collator exactly as a text task's "text" does (labels: the class ids B, or
with label_targets the answer words' target ids B×Tt and the class ids as label_ids B); the image through the
image collator exactly as an image task's (resized to S, the vision model's size, and normalised with its
mean/std). Both are the existing collators, so nothing about either part differs from the one-modality tasks.

Two-image examples (NLVR²-style, VQA template B5, a user VQA file with an image2 column) carry "image2"; it goes
through the same image collator into pixel_values_2, and the composition encodes it as a second set of V visual
tokens (`backbones/image_text.py` `visual_tokens`). A batch is all one-image or all two-image: the visual
sequence length (V or 2V) is one per batch, and padding a missing image would make up tokens that do not exist.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import TaskError


class ImageTextProcessor:
    """An image-text model's two preprocessors: the text model's tokenizer and the vision model's image processor.

    It behaves as the tokenizer (calling it and reading its attributes go to the tokenizer), so code that encodes
    text with a model's preprocessor (label words, saving it) is unchanged; `make_collate("image_text", ...)`
    takes the two apart."""

    def __init__(self, tokenizer, image_processor=None):
        if tokenizer is None:
            raise TaskError("an image-text model needs a tokenizer for its questions, got None")
        self.tokenizer = tokenizer
        self.image_processor = image_processor

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        # Only reached for names this object lacks; the two parts themselves are never forwarded (a half-built
        # object, e.g. while unpickling, must not recurse).
        if name in ("tokenizer", "image_processor"):
            raise AttributeError(name)
        return getattr(self.tokenizer, name)


def split_preprocessor(preprocessor) -> tuple:
    """(tokenizer, image processor or None) from an ImageTextProcessor or a bare tokenizer."""
    if isinstance(preprocessor, ImageTextProcessor):
        return preprocessor.tokenizer, preprocessor.image_processor
    return preprocessor, None


class ImageTextCollator:
    """Question → the text collator's keys, image → pixel_values; `label_targets` is the text collator's (the
    evaluation reads it for text-to-text scoring)."""

    def __init__(self, text_collator, image_collator):
        self.text = text_collator
        self.image = image_collator

    @property
    def label_targets(self):
        return self.text.label_targets

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise TaskError("cannot collate an empty batch")
        missing = [i for i, ex in enumerate(examples) if "image" not in ex or "text" not in ex]
        if missing:
            raise TaskError(f"image_text examples need an 'image' and a 'text' (the question); examples "
                            f"{missing[:5]} of the batch lack one")
        two = [i for i, ex in enumerate(examples) if ex.get("image2") is not None]
        if two and len(two) != len(examples):
            one = [i for i, ex in enumerate(examples) if ex.get("image2") is None]
            raise TaskError(f"a batch mixes one-image and two-image examples (examples {two[:5]} have an "
                            f"'image2', examples {one[:5]} do not); a batch must be all one or the other: train "
                            "a two-image template (e.g. digits-vqa/B5) on its own")
        batch = self.text(examples)                                              # question ids, labels
        batch["pixel_values"] = self.image(examples)["pixel_values"]             # B×3×S×S, normalised
        if two:                                                                  # the second image, alike
            batch["pixel_values_2"] = self.image([{**ex, "image": ex["image2"]} for ex in examples])["pixel_values"]
        return batch

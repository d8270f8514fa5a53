"""Batch collation: lists of task examples -> dicts of tensors for a model.

``make_collate`` returns a picklable callable (safe for DataLoader workers).
Text batches go through a Hugging Face tokenizer; image batches are converted,
resized and normalised with torch on the whole batch, which is much faster than
per-image PIL work and needs no torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import TaskError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224
IGNORE_INDEX = -100  # positions the LM loss skips


def make_collate(
    task_kind: str,
    preprocessor=None,
    *,
    max_length: int = 128,
    pad_to_max_length: bool = False,
    image_size: int | None = None,
    causal_lm: bool = False,
    regression: bool = False,
    label_targets: list[list[int]] | None = None,
):
    """Build the collate function for ``task_kind`` ("text", "image" or "image_text").

    text:  ``preprocessor`` is a tokenizer. Returns input_ids and attention_mask
           (B, L) (plus token_type_ids when the tokenizer makes them) and labels:
           the class ids (B,), with ``regression`` the float32 targets (B,), or with
           ``causal_lm`` the input_ids with padding set to -100 (B, L), or with
           ``label_targets`` (text-to-text: per class its label-word ids + EOS)
           the target ids of each example's class (B, Tt; -100 after the end)
           and the class ids as ``label_ids`` (B,). L is
           ``max_length`` when ``pad_to_max_length`` (fixed shapes for memory
           measurements), else the longest sequence in the batch, never more than
           ``max_length``. Examples with a ``text_pair`` are encoded as the
           tokenizer encodes pairs: for BERT-style tokenizers (the bundled one)
           ``[CLS] a [SEP] b [SEP]`` with token_type_ids 0 for a and 1 for b;
           truncation shortens the longer text first.
    image: ``preprocessor`` is an image processor or None. Returns pixel_values
           (B, 3, S, S) float32 and labels (B,).
    image_text: the question as text plus the image (``image_text_collate``): ``preprocessor`` is an
           ``ImageTextProcessor`` (tokenizer + the vision model's image processor, which sizes and normalises
           the image unless ``image_size`` is given) or a bare tokenizer (ImageNet mean/std, size 224).
    """
    if task_kind == "text":
        if preprocessor is None:
            raise TaskError("text collation needs a tokenizer as preprocessor, got None")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise TaskError(f"max_length must be a positive integer, got {max_length!r}")
        if sum((bool(causal_lm), bool(regression), label_targets is not None)) > 1:
            raise TaskError("causal_lm=True, regression=True and label_targets exclude each other")
        return TextCollator(preprocessor, max_length, bool(pad_to_max_length), bool(causal_lm), bool(regression),
                            label_targets)
    if task_kind == "image":
        if causal_lm or regression or label_targets is not None:
            raise TaskError("causal_lm=True / regression=True / label_targets apply to text tasks only, "
                            "not image tasks")
        size = image_size if image_size is not None else processor_image_size(preprocessor)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise TaskError(f"image_size must be a positive integer, got {size!r}")
        mean, std = processor_mean_std(preprocessor)
        return ImageCollator(size, mean, std)
    task_kind = "image_text" if task_kind == "image_caption" else task_kind   # a caption collates as a question
    if task_kind == "image_text":
        from .image_text_collate import ImageTextCollator, split_preprocessor

        tokenizer, image_processor = split_preprocessor(preprocessor)
        text = make_collate("text", tokenizer, max_length=max_length, pad_to_max_length=pad_to_max_length,
                            causal_lm=causal_lm, regression=regression, label_targets=label_targets)
        return ImageTextCollator(text, make_collate("image", image_processor, image_size=image_size))
    raise TaskError(f"unknown task kind {task_kind!r}; expected 'text' or 'image', or 'image_text' (an image with "
                    "a question)")


# ---------------------------------------------------------------------------- text


class TextCollator:
    def __init__(self, tokenizer, max_length: int, pad_to_max_length: bool, causal_lm: bool,
                 regression: bool = False, label_targets: list[list[int]] | None = None):
        if getattr(tokenizer, "pad_token", None) is None:
            eos = getattr(tokenizer, "eos_token", None)
            if eos is None:
                raise TaskError(
                    "tokenizer has neither a pad token nor an eos token to pad with; "
                    "set tokenizer.pad_token first"
                )
            # Decoder tokenizers (GPT-2, Llama) ship without a pad token. Padding with
            # eos is the usual choice; padded positions are masked out anyway.
            tokenizer.pad_token = eos
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.padding = "max_length" if pad_to_max_length else "longest"
        self.causal_lm = causal_lm
        self.regression = regression
        self.label_targets = label_targets

    def _pairs(self, examples: Sequence[dict]) -> list[str] | None:
        """The second texts of a batch of pairs, None for single texts; a mixed batch is an error."""
        paired = sum("text_pair" in ex for ex in examples)
        if paired and paired != len(examples):
            raise TaskError(f"a batch mixes sentence pairs and single texts ({paired} of {len(examples)} "
                            "examples have a text_pair)")
        return [ex["text_pair"] for ex in examples] if paired else None

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise TaskError("cannot collate an empty batch")
        enc = self.tokenizer(
            [ex["text"] for ex in examples],
            self._pairs(examples),
            padding=self.padding,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        if self.causal_lm:
            # Next-token targets are the inputs themselves (the model shifts them);
            # pad positions are found from the mask, not the id, because pad may equal eos.
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = IGNORE_INDEX
            batch["labels"] = labels
        elif self.regression:
            batch["labels"] = torch.tensor([float(ex["label"]) for ex in examples], dtype=torch.float32)
        elif self.label_targets is not None:
            classes = [int(ex["label"]) for ex in examples]
            batch["labels"] = pad_targets([self.label_targets[c] for c in classes])           # B×Tt
            batch["label_ids"] = torch.tensor(classes, dtype=torch.long)
        else:
            batch["labels"] = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        return batch


def pad_targets(rows: list[list[int]]) -> torch.Tensor:
    """Token-id lists → B×Tt long, padded with -100 (positions the loss skips)."""
    out = torch.full((len(rows), max(len(r) for r in rows)), IGNORE_INDEX, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


# --------------------------------------------------------------------------- image


def _size_field(size, field: str):
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(field)
    return getattr(size, field, None)  # transformers' SizeDict


def processor_image_size(processor) -> int:
    """Square side the processor would produce: its crop size when it crops,
    else its resize target, else 224.

    Where a processor resizes then centre-crops (e.g. 256 -> 224), the image is
    resized straight to the crop size: for small, centred images such as digits
    a crop would cut off content.
    """
    if processor is None:
        return DEFAULT_IMAGE_SIZE
    candidates = []
    if getattr(processor, "do_center_crop", False):
        candidates.append(getattr(processor, "crop_size", None))
    candidates.append(getattr(processor, "size", None))
    for size in candidates:
        if isinstance(size, int):
            return size
        for field in ("height", "shortest_edge", "width"):
            value = _size_field(size, field)
            if value:
                return int(value)
    return DEFAULT_IMAGE_SIZE


def processor_mean_std(processor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if processor is None:
        return IMAGENET_MEAN, IMAGENET_STD
    if getattr(processor, "do_normalize", True) is False:
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean = getattr(processor, "image_mean", None) or IMAGENET_MEAN
    std = getattr(processor, "image_std", None) or IMAGENET_STD
    if isinstance(mean, (int, float)):
        mean = (mean,) * 3
    if isinstance(std, (int, float)):
        std = (std,) * 3
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _as_hwc(image) -> np.ndarray:
    """uint8 (H, W) / (H, W, 1) / (H, W, 3) / (H, W, 4) -> (H, W, C) with C in 1, 3, 4."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise TaskError(
            f"image must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {array.shape}"
        )
    return array


def _to_rgb(batch: np.ndarray) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, 3, H, W) float in 0..255."""
    # np.stack made a fresh, writable copy, so from_numpy shares nothing with the
    # (read-only, cached) dataset arrays.
    t = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)  # grey -> RGB by repeating the channel
    elif t.shape[1] == 4:
        t = t[:, :3]  # drop alpha
    return t


class ImageCollator:
    def __init__(self, image_size: int, mean, std):
        self.image_size = image_size
        # (1, 3, 1, 1) so they broadcast over (B, 3, S, S).
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.image_size, self.image_size):
            return x
        # antialias matters when shrinking large photos; for upscaling it is a no-op.
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                             align_corners=False, antialias=True)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise TaskError("cannot collate an empty batch")
        images = [_as_hwc(ex["image"]) for ex in examples]
        if len({img.shape for img in images}) == 1:
            pixels = self._resize(_to_rgb(np.stack(images)))  # one interpolate for the batch
        else:  # mixed sizes or channels (user folders): convert and resize each, then join
            pixels = torch.cat([self._resize(_to_rgb(np.stack([img]))) for img in images])
        pixels = (pixels / 255.0).clamp_(0.0, 1.0)  # bilinear overshoot stays in range
        pixels = (pixels - self.mean) / self.std
        labels = torch.tensor([int(ex["label"]) for ex in examples], dtype=torch.long)
        return {"pixel_values": pixels.contiguous(), "labels": labels}

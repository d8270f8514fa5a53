"""Reader for a user image folder: one sub-folder per class.

Layouts accepted::

    ROOT/<class>/<image>                       fixed 80/20 stratified split
    ROOT/train/<class>/<image> + ROOT/test/<class>/<image>

Class names are the sub-folder names, sorted. Images are returned as uint8
arrays, (H, W) for grey and (H, W, 3) for colour, the same as the bundled sets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Task, TaskError
from .splits import stratified_split, stratified_subset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_SPLIT_SALT = "memtune-folder-split-v1"


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("L", "RGB"):
                converted = img
            elif img.mode.startswith("I;16"):
                # 16-bit grey: keep the top byte rather than clipping at 255.
                return (np.asarray(img).astype(np.uint32) >> 8).astype(np.uint8)
            elif img.mode in ("1", "I", "F", "LA"):
                converted = img.convert("L")
            else:  # RGBA, P, CMYK, YCbCr, ...: drop alpha / palette
                converted = img.convert("RGB")
            return np.asarray(converted, dtype=np.uint8).copy()
    except (UnidentifiedImageError, OSError) as err:
        raise TaskError(f"cannot read image {path}: {err}") from None


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _scan(root: Path) -> dict[str, list[Path]]:
    classes = _class_dirs(root)
    if not classes:
        raise TaskError(
            f"image folder {root} has no class sub-folders; expected ROOT/<class>/<image> "
            f"(or ROOT/train/<class>/... and ROOT/test/<class>/...) with {list(IMAGE_SUFFIXES)} files"
        )
    found = {c.name: _images_in(c) for c in classes}
    empty = [name for name, files in found.items() if not files]
    if empty:
        raise TaskError(
            f"image folder {root}: class folder(s) {empty} contain no images "
            f"(accepted suffixes: {list(IMAGE_SUFFIXES)})"
        )
    if len(found) < 2:
        raise TaskError(
            f"image folder {root} has {len(found)} class ({sorted(found)}); "
            "classification needs at least 2 class sub-folders"
        )
    return found


def load_image_folder(root: Path, name: str, *, train_limit=None, test_limit=None,
                      seed: int = 0) -> Task:
    """Read the folder; limits pick files before decoding so large folders stay cheap."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_files, test_files = _scan(root / "train"), _scan(root / "test")
        extra = sorted(set(test_files) - set(train_files))
        if extra:
            raise TaskError(
                f"image folder {root}: test classes {extra} have no folder under train/ "
                f"(train classes: {sorted(train_files)})"
            )
        label_names = sorted(train_files)
        index = {c: i for i, c in enumerate(label_names)}
        pairs = lambda files: [(p, index[c]) for c in sorted(files) for p in files[c]]  # noqa: E731
        train_pairs, test_pairs = pairs(train_files), pairs(test_files)
    else:
        files = _scan(root)
        label_names = sorted(files)
        all_pairs = [(p, i) for i, c in enumerate(label_names) for p in files[c]]
        train_idx, test_idx = stratified_split([y for _, y in all_pairs], salt=FOLDER_SPLIT_SALT)
        train_pairs = [all_pairs[i] for i in train_idx]
        test_pairs = [all_pairs[i] for i in test_idx]
    train_pairs = [train_pairs[i] for i in
                   stratified_subset([y for _, y in train_pairs], train_limit, seed, stream=0)]
    test_pairs = [test_pairs[i] for i in
                  stratified_subset([y for _, y in test_pairs], test_limit, seed, stream=1)]
    load = lambda pairs: [{"image": _read_image(p), "label": y} for p, y in pairs]  # noqa: E731
    return Task(name=name, kind="image", train=load(train_pairs), test=load(test_pairs),
                label_names=label_names)

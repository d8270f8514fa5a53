"""Fixed train/test splits and seeded, class-stratified subsets.

Fixed splits order items by a SHA-256 hash of a salted key instead of a random
generator, so they depend on neither NumPy's generator nor the caller's seed:
the same file always gives the same test set, and runs with different training
seeds are evaluated on the same examples.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Hashable, Sequence

import numpy as np

from .base import TaskError

TEST_FRACTION = 0.2


def _hash_rank(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def stable_order(keys: Sequence[str], salt: str) -> list[int]:
    """Positions of ``keys`` sorted by salted hash: a fixed pseudo-random order."""
    return sorted(range(len(keys)), key=lambda i: _hash_rank(f"{salt}\x00{keys[i]}"))


def stratified_split(
    labels: Sequence[int], salt: str, test_fraction: float = TEST_FRACTION
) -> tuple[list[int], list[int]]:
    """Split positions into (train, test) with ``test_fraction`` of every class in test.

    Each class contributes ``round(test_fraction * n_class)`` examples to test, so
    class balance is the same on both sides. If rounding leaves test empty (tiny
    data), one example of the largest class moves there so both sides exist.
    Both lists come back in the original order.
    """
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    test: set[int] = set()
    for y in sorted(by_class):
        idx = by_class[y]
        order = stable_order([str(i) for i in idx], f"{salt}:{y}")
        n_test = int(round(test_fraction * len(idx)))
        test.update(idx[j] for j in order[:n_test])
    if not test and len(labels) >= 2:
        biggest = max(by_class, key=lambda y: (len(by_class[y]), -y))
        idx = by_class[biggest]
        test.add(idx[stable_order([str(i) for i in idx], f"{salt}:{biggest}")[0]])
    train = [i for i in range(len(labels)) if i not in test]
    return train, sorted(test)


def group_split(
    groups: Sequence[str], salt: str, test_fraction: float = TEST_FRACTION
) -> tuple[list[int], list[int]]:
    """Split positions so that no group (e.g. a movie) has items on both sides.

    Groups are taken in a fixed hashed order and moved to test until test holds
    at least ``test_fraction`` of the items.
    """
    members: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    names = sorted(members)
    target = test_fraction * len(groups)
    test: set[int] = set()
    for j in stable_order(names, salt):
        if len(test) >= target:
            break
        test.update(members[names[j]])
    train = [i for i in range(len(groups)) if i not in test]
    return train, sorted(test)


def check_limit(limit, what: str) -> int | None:
    """Validate a ``train_limit`` / ``test_limit`` argument."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise TaskError(f"{what} must be a positive integer or None, got {limit!r}")
    return int(limit)


def stratified_subset(
    labels: Sequence[Hashable], limit: int | None, seed: int, stream: int = 0
) -> list[int]:
    """Positions of a seeded random subset of size ``limit``, keeping class shares.

    Every class gets ``limit * share`` examples (largest remainders get the
    leftovers) and at least one when ``limit`` allows it, so small limits still
    see every class. The result is sorted, hence deterministic for a seed.
    """
    n = len(labels)
    if limit is None or limit >= n:
        return list(range(n))
    by_class: dict = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    classes = sorted(by_class, key=str)
    exact = {y: limit * len(by_class[y]) / n for y in classes}
    quota = {y: int(exact[y]) for y in classes}
    if limit >= len(classes):
        for y in classes:
            quota[y] = max(quota[y], 1)
    # Bring the total back to ``limit``: add to the largest remainders, take
    # from the largest quotas (never below one when a class was guaranteed one).
    floor = 1 if limit >= len(classes) else 0
    while sum(quota.values()) < limit:
        y = max(classes, key=lambda c: (exact[c] - quota[c], len(by_class[c]) - quota[c]))
        quota[y] += 1
    while sum(quota.values()) > limit:
        y = max((c for c in classes if quota[c] > floor), key=lambda c: quota[c] - exact[c])
        quota[y] -= 1
    rng = np.random.default_rng([stream, seed])
    chosen: list[int] = []
    for y in classes:
        idx = by_class[y]
        take = min(quota[y], len(idx))
        chosen.extend(int(idx[j]) for j in rng.choice(len(idx), size=take, replace=False))
    return sorted(chosen)


def random_subset(n: int, limit: int, seed: int, stream: int = 0) -> list[int]:
    """Sorted positions of a seeded random subset of ``limit`` of ``n`` items (no classes to keep)."""
    rng = np.random.default_rng([stream, seed])
    return sorted(int(i) for i in rng.choice(n, size=min(limit, n), replace=False))


def carve_validation(examples: Sequence[dict], fraction: float, seed: int,
                     stratify: bool = True) -> tuple[list[dict], list[dict]]:
    """Split training examples into (train, validation) for model and learning-rate selection.

    The validation part is carved from the training split only, so the test split is never looked at.
    Examples with a ``movie`` key (Rotten Tomatoes) are split by movie, like the train/test split, so that
    a movie never sits on both sides; others are split per class (stratified; ``stratify=False``, for
    regression targets, splits them as one group). The choice depends on
    ``seed``: each seed of a multi-seed run validates on its own carve-out, and the test set is shared.
    """
    if not 0 < fraction < 1:
        raise TaskError(f"validation fraction must be in (0, 1), got {fraction!r}")
    if len(examples) < 4:
        raise TaskError(f"a validation split needs at least 4 training examples, got {len(examples)}")
    salt = f"validation:{seed}"
    if all("movie" in ex for ex in examples):
        train_idx, val_idx = group_split([str(ex["movie"]) for ex in examples], salt, fraction)
    else:
        labels = [ex["label"] for ex in examples] if stratify else [0] * len(examples)
        train_idx, val_idx = stratified_split(labels, salt, fraction)
    if not train_idx or not val_idx:
        raise TaskError(f"a validation fraction of {fraction} leaves an empty side of {len(examples)} examples")
    return [examples[i] for i in train_idx], [examples[i] for i in val_idx]

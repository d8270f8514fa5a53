"""Trunk caching: the frozen trunk's outputs, computed once per training example and replayed later.

With a frozen backbone and inputs that are not augmented, blocks 0..s₀ compute the same tensors for an
example in every epoch. `TrunkCache` keeps, per example, what the rest of the DTL forward needs from them:
the tap inputs x_i (i ≤ s₀, i ≥ 1; x_0 is the embedding output, recomputed cheaply because the embedding
also yields the attention context) and the output of block s₀, before its injection.

Key contract: every training batch carries `batch["example_id"]`, an integer tensor (B,) that names the
example stably across epochs: the same id always means the same (unaugmented) input, and different examples
have different ids (the dataset index is the natural choice). The cache is used in training mode only, so
ids of an evaluation split never collide with training ids.

Layout: an example stores only its real token rows (ViT: all T; BERT: the rows where attention_mask = 1, at
any padding side), each row holding K tensors × D values: a (T_e, K, D) block. Replaying it scatters the rows
back into the batch's positions; padded rows are zero, which the uncached path also does (see `model.py`),
so the two paths see the same tensors bit for bit.

Storage: in memory, one tensor per example on `device` (default: wherever the trunk ran, so a GPU run keeps
its cache in GPU memory: replaying from host memory costs a host-to-device copy of K×B×T×D values per batch,
which on a GPU is slower than recomputing a ViT-S trunk, measured in benchmarks/dtl_trunk_cache.py), or, with
`directory`, in one memory-mapped numpy file there that grows as needed (bytes, so bf16 works too; deleted
when the cache is closed or collected). Either way at most `max_bytes` bytes of tensor data are stored;
going over raises `TrunkCacheError`.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch


class TrunkCacheError(RuntimeError):
    """The trunk cache cannot serve a batch: budget exhausted, no example ids, or inconsistent ids."""


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class TrunkCache:
    """Per-example rows (T_e, K, D) keyed by integer example id; see the module docstring for the contract."""

    def __init__(self, max_bytes: int, directory: str | os.PathLike | None = None,
                 device: str | torch.device | None = None):
        if max_bytes <= 0:
            raise TrunkCacheError(f"trunk cache: max_bytes must be positive, got {max_bytes}")
        if directory is not None and device is not None:
            raise TrunkCacheError("trunk cache: a cache in a directory lives in host memory maps; "
                                  "give a directory or a device, not both")
        self.max_bytes = int(max_bytes)
        self.directory = None if directory is None else os.fspath(directory)
        self.device = None if device is None else torch.device(device)   # None: the rows' own device
        self.row_shape: tuple[int, int] | None = None     # (K, D), fixed by the first `put`
        self.dtype: torch.dtype | None = None
        self.index: dict[int, tuple[int, int]] = {}        # id → (first row, number of rows)
        self.rows_used = 0
        self.hits = 0                                      # batches served from the cache
        self._mem: dict[int, torch.Tensor] = {}            # in-memory storage: id → (T_e, K, D)
        self._path: str | None = None
        self._map: np.memmap | None = None                 # on-disk storage: capacity × row_bytes (uint8)

    # -- facts ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index)

    @property
    def row_bytes(self) -> int:
        if self.row_shape is None:
            return 0
        k, d = self.row_shape
        return k * d * torch.empty((), dtype=self.dtype).element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data stored."""
        return self.rows_used * self.row_bytes

    def contains_all(self, ids: list[int]) -> bool:
        return all(i in self.index for i in ids)

    # -- storing ----------------------------------------------------------------------------------------
    def put(self, ids: list[int], rows: torch.Tensor, lengths: list[int]) -> None:
        """Store examples `ids`: `rows` is (Σ lengths)×K×D, example j's rows in order, lengths[j] of them.

        Ids already stored are skipped (their tensors are the same by the key contract).
        """
        if len(ids) != len(set(ids)):
            raise TrunkCacheError(f"trunk cache: a batch repeats an example_id ({ids}); ids must name "
                                  "distinct examples")
        if self.row_shape is None:
            self.row_shape, self.dtype = (rows.shape[1], rows.shape[2]), rows.dtype
        elif (rows.shape[1], rows.shape[2]) != self.row_shape or rows.dtype != self.dtype:
            raise TrunkCacheError(f"trunk cache holds rows of {self.row_shape} {self.dtype}, got "
                                  f"{tuple(rows.shape[1:])} {rows.dtype}: one cache serves one model")
        rows = rows.detach().to("cpu" if self.directory is not None else (self.device or rows.device))
        pieces = rows.split(lengths)
        new = [(i, p) for i, p in zip(ids, pieces) if i not in self.index]
        need = sum(p.shape[0] for _, p in new) * self.row_bytes
        if self.nbytes + need > self.max_bytes:
            per_example = need // max(1, len(new))
            raise TrunkCacheError(
                f"trunk cache budget too small: cache_max_bytes={self.max_bytes} ({_fmt(self.max_bytes)}) "
                f"already holds {len(self)} examples ({_fmt(self.nbytes)}) and this batch needs "
                f"{_fmt(need)} more (about {_fmt(per_example)} per example: up to T tokens × {self.row_shape[0]} "
                f"tensors × {self.row_shape[1]} values × {self.row_bytes // (self.row_shape[0] * self.row_shape[1])} "
                f"bytes). Raise cache_max_bytes to at least that per example × the number of training examples, "
                f"use a cache_dir on disk with room for it, or set cache_trunk=false")
        if self.directory is None:
            for i, p in new:
                self._mem[i] = p
                self.index[i] = (-1, p.shape[0])
                self.rows_used += p.shape[0]
            return
        total = sum(p.shape[0] for _, p in new)
        self._reserve(self.rows_used + total)
        start = self.rows_used
        for i, p in new:
            self.index[i] = (start, p.shape[0])
            start += p.shape[0]
        if new:
            block = torch.cat([p for _, p in new]).contiguous()
            flat = block.view(torch.uint8).reshape(total, self.row_bytes).numpy()
            self._map[self.rows_used:self.rows_used + total] = flat
        self.rows_used += total

    def _reserve(self, rows: int) -> None:
        """Grow the memory-mapped file to hold at least `rows` rows (doubling, never past max_bytes)."""
        cap = 0 if self._map is None else self._map.shape[0]
        if rows <= cap:
            return
        limit = self.max_bytes // self.row_bytes
        new_cap = min(limit, max(rows, 2 * cap, 4096))
        if self._path is None:
            os.makedirs(self.directory, exist_ok=True)
            fd, self._path = tempfile.mkstemp(prefix="trunk_cache_", suffix=".bin", dir=self.directory)
            os.close(fd)
        if self._map is not None:
            self._map.flush()
            self._map = None
        with open(self._path, "r+b") as f:
            f.truncate(new_cap * self.row_bytes)
        self._map = np.memmap(self._path, dtype=np.uint8, mode="r+", shape=(new_cap, self.row_bytes))

    # -- reading ----------------------------------------------------------------------------------------
    def get(self, ids: list[int], lengths: list[int]) -> torch.Tensor:
        """Rows of examples `ids` in order: (Σ lengths)×K×D on the storage device (the CPU for a directory).

        Lengths must match what was stored."""
        for i, n in zip(ids, lengths):
            stored = self.index[i][1]
            if stored != n:
                raise TrunkCacheError(
                    f"example_id {i} was cached with {stored} token rows but now has {n}: example ids must name "
                    "the same unaugmented input in every epoch (set cache_trunk=false when inputs change)")
        self.hits += 1
        if self.directory is None:
            return torch.cat([self._mem[i] for i in ids])
        rows = np.concatenate([np.arange(self.index[i][0], self.index[i][0] + n) for i, n in zip(ids, lengths)])
        raw = torch.from_numpy(np.ascontiguousarray(self._map[rows]))              # (Σ T_e)×row_bytes
        return raw.view(self.dtype).view(len(rows), *self.row_shape)

    # -- lifetime ---------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Forget every example (and delete the on-disk file)."""
        self.index.clear()
        self._mem.clear()
        self.rows_used = 0
        self._map = None
        if self._path is not None:
            try:
                os.remove(self._path)
            except OSError:
                pass
            self._path = None

    close = clear

    def __del__(self):
        try:
            self.clear()
        except Exception:
            pass

    def __repr__(self) -> str:
        where = f"{self.device or 'trunk device'} memory" if self.directory is None else f"disk ({self.directory})"
        return (f"TrunkCache({len(self)} examples, {_fmt(self.nbytes)} of {_fmt(self.max_bytes)}, in {where}, "
                f"{self.hits} batch hits)")

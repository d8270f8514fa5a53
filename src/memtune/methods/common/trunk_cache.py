"""Trunk caching: a frozen trunk's per-example outputs, computed once and replayed in later epochs.

A side method runs a frozen, deterministic part of the backbone (the "trunk") without a graph and reads K
of its outputs ("taps", each B×T×D). Those do not change between epochs for the same input, so they can be
stored per example and replayed. Use from a model:

    cache = config.make_trunk_cache()                        # None when cache_trunk is off
    taps = cached_trunk(cache, batch, mask, input_keys, compute)
        # compute() -> [K tensors B×T×D] runs the trunk; mask: B×T (1 real token) or None (all real).
        # Returns the same list, replayed from the cache when every example of the batch is stored and
        # verified; otherwise computed (and stored). Training mode only is the caller's choice.

Keys and verification. Every batch carries `batch["example_id"]` (B,), an integer naming each example
stably across epochs (the dataset index). Each entry also stores a 64-bit checksum of the example's input
(`input_checksums`: blake2b over the real tokens' ids and their positions, or over the pixel values), and
every hit is verified against it: an input that changed under the same id (an augmented image, another
text) is recomputed and stored anew, with one warning (`verify="warn"`), or refused with a TrunkCacheError
(`verify="strict"`). Only real token rows are stored (a (T_e, K, D) block per example), so an example may be
replayed into batches of any padded length; padded rows are zero in both paths.

Storage: host (CPU) memory by default, or one memory-mapped file in `directory` (deleted on close); in the
trunk's dtype, or bf16 (`dtype=torch.bfloat16`: half the bytes; then the first epoch also sees the rounded
values, so every epoch trains on the same taps). At most `max_bytes` are stored; going over raises.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from ..base import ConfigError, check

CACHE_DTYPES = {"full": None, "bf16": torch.bfloat16}
CACHE_VERIFY = ("warn", "strict")


class TrunkCacheError(ConfigError):
    """The trunk cache cannot serve a batch: budget exhausted, no example ids, or a changed input (strict)."""


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# -- checksums and row packing ---------------------------------------------------------------------------------
def input_checksums(batch: dict, keys: tuple[str, ...], mask: torch.Tensor | None) -> list[int]:
    """One 64-bit checksum per example over its model inputs among `keys`.

    With a token mask (B×T), only the real tokens count, with their positions: the same right-padded text
    gives the same checksum in a batch of any length, while a shifted (left-padded) one does not, since
    absolute positions change its trunk outputs.
    """
    present = [k for k in keys if torch.is_tensor(batch.get(k)) and k != "attention_mask"]
    cpu = {k: batch[k].detach().cpu() for k in present}
    real = None if mask is None else mask.detach().cpu().bool()
    sums = []
    for b in range(next(iter(cpu.values())).shape[0]):
        h = hashlib.blake2b(digest_size=8)
        if real is not None:
            where = real[b].nonzero().flatten()
            h.update(where.numpy().tobytes())
        for k in present:
            row = cpu[k][b]
            if real is not None and row.dim() >= 1 and row.shape[0] == real.shape[1]:
                row = row[where]
            h.update(k.encode())
            h.update(row.contiguous().numpy().tobytes())
        sums.append(int.from_bytes(h.digest(), "little"))
    return sums


def pack_rows(taps: list[torch.Tensor], real: torch.Tensor) -> torch.Tensor:
    """K tensors B×T×D and real B×T (bool) → (Σ real tokens)×K×D, example by example."""
    return torch.stack(taps, dim=2)[real]


def unpack_rows(rows: torch.Tensor, real: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of `pack_rows`: K tensors B×T×D, zero in padded rows."""
    k, d = rows.shape[1], rows.shape[2]
    out = rows.new_zeros(k, *real.shape, d)                   # K×B×T×D: each tap contiguous
    out.permute(1, 2, 0, 3)[real] = rows
    return list(out.unbind(0))


# -- the store --------------------------------------------------------------------------------------------------
class TrunkCache:
    """Per-example rows (T_e, K, D) keyed by integer example id, each with its input checksum."""

    def __init__(self, max_bytes: int, directory: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None, verify: str = "warn"):
        if max_bytes <= 0:
            raise TrunkCacheError(f"trunk cache: max_bytes must be positive, got {max_bytes}")
        if verify not in CACHE_VERIFY:
            raise TrunkCacheError(f"trunk cache: verify must be one of {', '.join(CACHE_VERIFY)}, got {verify!r}")
        self.max_bytes = int(max_bytes)
        self.directory = None if directory is None else os.fspath(directory)
        self.store_dtype = dtype                           # None: the trunk's own dtype
        self.verify = verify
        self.row_shape: tuple[int, int] | None = None      # (K, D), fixed by the first store
        self.dtype: torch.dtype | None = None              # dtype of the stored rows
        self.index: dict[int, tuple[int, int, int]] = {}   # id → (first row, number of rows, checksum)
        self.rows_used = 0
        self.hits = 0                                      # batches served from the cache
        self.mismatches = 0                                # examples whose input changed under their id
        # How many examples the run will store (set by the training loop): the first store then checks that
        # all of them fit, so a run too big for the budget stops at its first batch, not deep into epoch 1.
        self.expected_examples: int | None = None
        self._warned = False
        self._mem: dict[int, torch.Tensor] = {}            # host memory: id → (T_e, K, D)
        self._path: str | None = None
        self._map: np.memmap | None = None                 # on disk: capacity × row_bytes (uint8)

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
        """Bytes of tensor data held (host memory or file)."""
        return self.rows_used * self.row_bytes

    def contains_all(self, ids: list[int]) -> bool:
        return all(i in self.index for i in ids)

    def round_trip(self, rows: torch.Tensor) -> torch.Tensor:
        """What a replay of `rows` gives back (rows itself unless the cache stores a smaller dtype)."""
        if self.store_dtype is None or rows.dtype == self.store_dtype:
            return rows
        return rows.to(self.store_dtype).to(rows.dtype)

    # -- reading ----------------------------------------------------------------------------------------
    def fetch(self, ids: list[int], checksums: list[int], lengths: list[int]) -> torch.Tensor | None:
        """Stored rows of `ids` in order, (Σ lengths)×K×D on the CPU, or None unless every id is stored with
        the same checksum and length. A stored id whose input changed is reported (warn once, or raise)."""
        if not self.contains_all(ids):
            return None
        changed = [i for i, c, n in zip(ids, checksums, lengths) if self.index[i][2] != c or self.index[i][1] != n]
        if changed:
            self.mismatches += len(changed)
            msg = (f"trunk cache: the input of example_id {changed[0]} differs from the one cached under that id "
                   f"({len(changed)} example(s) in this batch); example ids must name the same input in every "
                   "epoch. Augmented or changed inputs are recomputed, never replayed")
            if self.verify == "strict":
                raise TrunkCacheError(msg + " (cache_verify=strict refuses them; use cache_verify=warn to "
                                            "recompute, or cache_trunk=false)")
            if not self._warned:
                warnings.warn(msg, stacklevel=4)
                self._warned = True
            return None
        self.hits += 1
        if self.directory is None:
            return torch.cat([self._mem[i] for i in ids])
        rows = np.concatenate([np.arange(self.index[i][0], self.index[i][0] + n) for i, n in zip(ids, lengths)])
        raw = torch.from_numpy(np.ascontiguousarray(self._map[rows]))              # (Σ T_e)×row_bytes
        return raw.view(self.dtype).view(len(rows), *self.row_shape)

    # -- storing ----------------------------------------------------------------------------------------
    def _remedy(self, per_example: int) -> str:
        k, d = self.row_shape
        return (f"About {_fmt(per_example)} per example (up to T tokens × {k} tensors × {d} values × "
                f"{self.row_bytes // (k * d)} bytes): raise cache_max_bytes to at least that × the number of "
                "training examples, use a cache_dir on disk with room for it, store bf16 (cache_dtype=bf16), or "
                "set cache_trunk=false")

    def store(self, ids: list[int], checksums: list[int], rows: torch.Tensor, lengths: list[int]) -> None:
        """Store examples `ids`: rows (Σ lengths)×K×D, example j's lengths[j] rows in order. An id already
        stored with the same checksum is kept; one with another checksum is replaced."""
        if len(ids) != len(set(ids)):
            raise TrunkCacheError(f"trunk cache: a batch repeats an example_id ({ids}); ids must name "
                                  "distinct examples")
        rows = rows.detach().to("cpu", self.store_dtype or rows.dtype)
        if self.row_shape is None:
            self.row_shape, self.dtype = (rows.shape[1], rows.shape[2]), rows.dtype
        elif (rows.shape[1], rows.shape[2]) != self.row_shape or rows.dtype != self.dtype:
            raise TrunkCacheError(f"trunk cache holds rows of {self.row_shape} {self.dtype}, got "
                                  f"{tuple(rows.shape[1:])} {rows.dtype}: one cache serves one model")
        pieces = rows.split(lengths)
        new = [(i, c, p) for i, c, p in zip(ids, checksums, pieces)
               if i not in self.index or self.index[i][2] != c]
        in_place = [(i, c, p) for i, c, p in new if i in self.index and self.index[i][1] == p.shape[0]]
        grow = [(i, c, p) for i, c, p in new if not (i in self.index and self.index[i][1] == p.shape[0])]
        if self.directory is None:
            grow, in_place = new, []                        # memory: a replaced entry frees the old one
        need = sum(p.shape[0] for _, _, p in grow) * self.row_bytes
        freed = sum(self.index[i][1] for i, _, _ in grow if i in self.index) * self.row_bytes \
            if self.directory is None else 0
        per_example = need // max(1, len(grow))
        if self.expected_examples and not self.index and grow and per_example * self.expected_examples > self.max_bytes:
            raise TrunkCacheError(
                f"trunk cache budget too small for this run: its {self.expected_examples} training examples need "
                f"about {_fmt(per_example * self.expected_examples)} (estimated from the first batch) but "
                f"cache_max_bytes={self.max_bytes} ({_fmt(self.max_bytes)}). " + self._remedy(per_example))
        if self.nbytes + need - freed > self.max_bytes:
            raise TrunkCacheError(
                f"trunk cache budget too small: cache_max_bytes={self.max_bytes} ({_fmt(self.max_bytes)}) "
                f"already holds {len(self)} examples ({_fmt(self.nbytes)}) and this batch needs {_fmt(need)} "
                "more. " + self._remedy(per_example))
        if self.directory is None:
            for i, c, p in grow:
                if i in self.index:
                    self.rows_used -= self.index[i][1]
                self._mem[i] = p.clone()                    # own storage: not a view of the whole batch
                self.index[i] = (-1, p.shape[0], c)
                self.rows_used += p.shape[0]
            return
        for i, c, p in in_place:                            # same length: overwrite the old rows
            start = self.index[i][0]
            self._map[start:start + p.shape[0]] = self._as_bytes(p)
            self.index[i] = (start, p.shape[0], c)
        total = sum(p.shape[0] for _, _, p in grow)
        if total:
            self._reserve(self.rows_used + total)
            start = self.rows_used
            for i, c, p in grow:
                self.index[i] = (start, p.shape[0], c)
                start += p.shape[0]
            self._map[self.rows_used:self.rows_used + total] = self._as_bytes(torch.cat([p for _, _, p in grow]))
            self.rows_used += total

    def _as_bytes(self, block: torch.Tensor) -> np.ndarray:
        return block.contiguous().view(torch.uint8).reshape(block.shape[0], self.row_bytes).numpy()

    def _reserve(self, rows: int) -> None:
        """Grow the memory-mapped file to hold at least `rows` rows (doubling, never past max_bytes)."""
        cap = 0 if self._map is None else self._map.shape[0]
        if rows <= cap:
            return
        new_cap = min(self.max_bytes // self.row_bytes, max(rows, 2 * cap, 4096))
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
        where = "host memory" if self.directory is None else f"disk ({self.directory})"
        return (f"TrunkCache({len(self)} examples, {_fmt(self.nbytes)} of {_fmt(self.max_bytes)}, in {where}, "
                f"{self.hits} batch hits, {self.mismatches} changed inputs)")


# -- the calls a model makes ------------------------------------------------------------------------------------
def example_ids(batch: dict, rows: int) -> list[int]:
    """batch["example_id"] as a list of `rows` ints; a clear error where the loader gave none."""
    if batch.get("example_id") is None:
        raise TrunkCacheError(
            "cache_trunk=True needs batch['example_id']: an integer tensor (B,) naming each example "
            "stably across epochs (e.g. its dataset index); the training data loader must supply it")
    ids = [int(i) for i in batch["example_id"].reshape(-1).tolist()]
    if len(ids) != rows:
        raise TrunkCacheError(f"batch['example_id'] has {len(ids)} ids for a batch of {rows}")
    return ids


def cached_features(cache: TrunkCache | None, batch: dict, mask: torch.Tensor | None, input_keys: tuple[str, ...],
                    compute, like: torch.Tensor) -> torch.Tensor:
    """One frozen output per example (a linear probe's pooled features, B×F), replayed as `cached_trunk` replays
    taps: stored as a single row per example and verified against the checksum of its real input tokens (mask:
    B×T or None), so a text replays into a batch of any padded length. Replays come back on `like`'s device and
    in its dtype (the head's weight); compute() -> B×F."""
    if cache is None or like.device.type == "meta":          # meta (memory planning): no values to cache
        return compute()
    sums = input_checksums(batch, input_keys, mask)
    ids = example_ids(batch, len(sums))
    ones = [1] * len(ids)
    rows = cache.fetch(ids, sums, ones)                     # B×1×F
    if rows is not None:
        return rows[:, 0].to(like.device, like.dtype)
    feats = compute()
    cache.store(ids, sums, feats.unsqueeze(1), ones)
    return cache.round_trip(feats)                          # every epoch sees the stored precision


def cached_trunk(cache: TrunkCache | None, batch: dict, mask: torch.Tensor | None, input_keys: tuple[str, ...],
                 compute, ref: torch.Tensor) -> list[torch.Tensor]:
    """Taps of the frozen trunk for `batch`: replayed from `cache` when possible, else `compute()`.

    compute() -> list of K tensors B×T×D with padded rows already zero. mask: B×T token mask or None.
    ref: a B×T×D tensor of the trunk's device and dtype (e.g. the embedding output). Without a cache this
    is just compute().
    """
    if cache is None or ref.device.type == "meta":           # meta (memory planning): no values to cache
        return compute()
    ids = example_ids(batch, ref.shape[0])
    real = (torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device) if mask is None
            else mask.to(ref.device).bool())                                       # B×T
    lengths = real.sum(1).tolist()
    sums = input_checksums(batch, input_keys, mask)
    rows = cache.fetch(ids, sums, lengths)
    if rows is not None:
        return unpack_rows(rows.to(ref.device, ref.dtype), real)
    taps = compute()
    packed = pack_rows(taps, real)                                                 # (Σ T_e)×K×D
    cache.store(ids, sums, packed, lengths)
    if cache.store_dtype is not None and cache.store_dtype != packed.dtype:
        return unpack_rows(cache.round_trip(packed), real)   # every epoch sees the stored precision
    return taps


# -- the options, shared by every method's config --------------------------------------------------------------
@dataclass
class TrunkCacheOptions:
    """Mixin for a method config: the trunk-cache options (see the module docstring).

    cache_trunk      replay the frozen trunk's outputs after the first time an example is seen (training
                     only; needs batch["example_id"] and a deterministic trunk: no dropout in it).
    cache_dir        keep the cache in a memory-mapped file in this folder instead of host memory.
    cache_dtype      "full" (the trunk's dtype: replays are bit-identical) or "bf16" (half the bytes).
    cache_verify     "warn": an input that changed under its id is recomputed, with one warning;
                     "strict": it is refused with an error.
    cache_max_bytes  the most bytes the cache may hold; going over raises a clear error.
    """
    cache_trunk: bool = False
    cache_dir: str | None = None
    cache_dtype: str = "full"
    cache_verify: str = "warn"
    cache_max_bytes: int = 4 * 2**30

    def validate_trunk_cache(self) -> None:
        n = self.name
        check(self.cache_dtype in CACHE_DTYPES,
              f"{n}.cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        check(self.cache_verify in CACHE_VERIFY,
              f"{n}.cache_verify must be one of {', '.join(CACHE_VERIFY)}, got {self.cache_verify!r}")
        check(self.cache_max_bytes >= 1, f"{n}.cache_max_bytes must be a positive number of bytes, "
                                         f"got {self.cache_max_bytes}")
        check(self.cache_dir is None or self.cache_trunk,
              f"{n}.cache_dir={self.cache_dir!r} is only used with cache_trunk=true")

    def make_trunk_cache(self) -> TrunkCache | None:
        if not self.cache_trunk:
            return None
        return TrunkCache(self.cache_max_bytes, self.cache_dir, CACHE_DTYPES[self.cache_dtype], self.cache_verify)


def check_trunk_deterministic(name: str, modules, trunk_dropout: bool) -> None:
    """ConfigError unless a cached trunk is deterministic: with `trunk_dropout` (the trunk runs in the
    module's train mode) any Dropout of p > 0 in `modules` makes its outputs differ between epochs."""
    if not trunk_dropout:
        return
    active = set()
    for mod in modules:
        for m in mod.modules():
            if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
                active.add(f"p={m.p}")
            for attr in ("dropout_prob", "attention_dropout"):     # attention kernels that take a float
                p = getattr(m, attr, None)
                if isinstance(p, float) and p > 0:
                    active.add(f"{attr}={p}")
    active = sorted(active)
    check(not active, f"{name}: cache_trunk needs a deterministic frozen trunk, but its dropout ({', '.join(active)}) "
                      f"is active in training; set trunk_dropout=false (the trunk then runs in eval mode) or "
                      f"cache_trunk=false")


@contextmanager
def trunk_eval_mode(module: torch.nn.Module, enabled: bool = True):
    """Run `module` in eval mode (no dropout) while inside, restoring every submodule's flag afterwards."""
    if not enabled:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode

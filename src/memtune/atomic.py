"""Atomic file writes: write a temporary file beside the target, fsync it, then rename over the target.

A crash or a full disk in the middle leaves the previous file untouched, and the temporary file is removed.
Files get the permissions of an ordinary `open()` (0o666 minus the umask), not mkstemp's private 0600.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


class DiskFullError(OSError):
    """Writing failed for lack of space; the previous file (if any) is intact."""


def is_disk_full(error: BaseException) -> bool:
    """A full disk (or quota) as the OS reports it, or as safetensors does: its writer raises its own
    `SafetensorError("... No space left on device (os error 28)")`, not an OSError."""
    if isinstance(error, DiskFullError):
        return True
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    from safetensors import SafetensorError

    return isinstance(error, SafetensorError) and ("No space left" in str(error) or "os error 28" in str(error))


def format_bytes(n: int | float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def disk_full(folder, what: str, needed_bytes: int | None, kept: str) -> DiskFullError:
    """The one-line report: which folder, how many bytes the write needed, how many are free, what is kept."""
    folder = Path(folder)
    try:
        free = f"{format_bytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = "free space unknown"
    need = f"needs about {format_bytes(needed_bytes)}, {free}" if needed_bytes else free
    return DiskFullError(errno.ENOSPC, f"no space left on the device in {folder} while writing {what} "
                                       f"({need}); {kept}")


def file_mode() -> int:
    """What `open(path, "w")` would give a new file: 0o666 minus the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(target: str | os.PathLike, needed_bytes: int | None = None):
    """Yield a temporary path in the target's folder; on success fsync and rename it onto `target`.

    `needed_bytes` (the size about to be written, when known) goes into the message of a full disk."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, file_mode())                 # mkstemp creates 0600: others could not read results
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException as e:
        _remove(tmp)
        if not isinstance(e, DiskFullError) and is_disk_full(e):
            raise disk_full(target.parent, target.name, needed_bytes,
                            "the previous version (if any) is kept") from None
        raise


def write_text(target, text: str) -> None:
    data = text.encode("utf-8")
    with atomic_path(target, needed_bytes=len(data)) as tmp:
        tmp.write_bytes(data)


def write_json(target, obj) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder: Path):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

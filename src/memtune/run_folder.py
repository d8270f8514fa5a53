"""A run folder (`--out`) belongs to one run: checked before training, locked while a run writes to it.

    check_run_folder(out, resume, overwrite)    before anything is loaded: --out is a writable folder (or can
                                                be made), holds no other run unless --overwrite, is not locked
    with RunFolder(out, overwrite) as folder:   OUT/.memtune.lock (pid and host inside, O_EXCL create) held
        folder.clear_previous_run()             until the run ends; --overwrite: the old run's files go here,
                                                only once the model and task have loaded

A lock left by a killed run (its pid no longer alive on this host) is taken over.
"""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

LOCK_NAME = ".memtune.lock"
# What `memtune train` writes into --out: their presence means the folder holds a run.
RUN_FILES = ("metrics.json", "adapter_model.safetensors", "adapter_config.json", "checkpoints")


def _argument_error(message: str):
    from .train import ArgumentError

    return ArgumentError(message)


def main_rank() -> bool:
    """True in a single process and in rank 0 of a launcher's (torch.distributed.run) processes."""
    return os.environ.get("RANK", "0") == "0"


def previous_run_files(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []


def continues_run(out: Path, resume) -> bool:
    """--resume names this run folder or a checkpoint inside it: the same run goes on."""
    if not resume:
        return False
    out, resume = out.resolve(), Path(resume).resolve()
    return resume == out or out in resume.parents


def check_run_folder(out, resume=None, overwrite: bool = False) -> None:
    """Refuse (ArgumentError, nothing written) an --out that cannot hold this run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise _argument_error(f"--out {out} is an existing file, not a folder; choose a folder for the run")
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise _argument_error(f"--out {out} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _argument_error(f"--out {out} cannot be written: no write permission on {existing}")
    holder = lock_holder(out / LOCK_NAME)
    if holder is not None and holder_alive(holder):
        raise _argument_error(_locked_message(out, holder))
    found = previous_run_files(out)
    if found and not overwrite and not continues_run(out, resume):
        raise _argument_error(f"--out {out} already holds another run ({', '.join(found)}); pass --overwrite to "
                              f"replace it, --resume {out} to continue it, or choose another --out")


def lock_holder(path: Path) -> tuple[int, str] | None:
    """(pid, host) written in a lock file; None if there is none. An unreadable lock counts as stale."""
    try:
        pid, host = path.read_text(encoding="utf-8").split()[:2]
        return int(pid), host
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return 0, socket.gethostname()


def holder_alive(holder: tuple[int, str]) -> bool:
    pid, host = holder
    if host != socket.gethostname():
        return True                      # another machine's process: it cannot be checked, so it is respected
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True                      # alive, owned by another user
    return True


def _locked_message(out: Path, holder: tuple[int, str]) -> str:
    return (f"another memtune run (pid {holder[0]} on {holder[1]}) is writing to --out {out}; wait for it to "
            f"finish or choose another --out (if no such run exists, delete {out / LOCK_NAME})")


class RunFolder:
    """Holds OUT/.memtune.lock while a run writes to OUT. Only the main process of a DDP run locks."""

    def __init__(self, out, overwrite: bool = False, main_process: bool | None = None):
        self.out = Path(out)
        self.lock = self.out / LOCK_NAME
        self.overwrite = overwrite
        self.main_process = main_rank() if main_process is None else main_process
        self._created = False
        self._held = False

    def __enter__(self) -> "RunFolder":
        if self.main_process:
            self._acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self._held:
            if lock_holder(self.lock) == (os.getpid(), socket.gethostname()):
                self.lock.unlink(missing_ok=True)
            self._held = False
        if self._created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()             # the run failed before writing anything: leave no empty folder

    def _acquire(self) -> None:
        self._created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = lock_holder(self.lock)
                if holder is not None and holder_alive(holder):
                    self.__exit__()
                    raise _argument_error(_locked_message(self.out, holder)) from None
                self.lock.unlink(missing_ok=True)        # stale: its run was killed
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            self._held = True
            return
        self.__exit__()
        raise _argument_error(f"--out {self.out}: could not take the run lock {self.lock} (another run keeps "
                              "taking it); choose another --out")

    def clear_previous_run(self, resume=None) -> list[str]:
        """With --overwrite, remove the files of the run that used this folder before (not other files)."""
        if not (self.main_process and self.overwrite) or continues_run(self.out, resume):
            return []
        removed = previous_run_files(self.out)
        for name in removed:
            path = self.out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return removed

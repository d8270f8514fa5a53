"""A run folder belongs to one run: finished runs are not retrained, a used folder is refused unless
--overwrite, a lock stops a second concurrent run, --out is checked before training, files get the umask."""
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memtune.cli import main
from memtune.run_folder import LOCK_NAME

from .test_faults import csv_task, error_line, train_argv  # noqa: F401  (csv_task: the shared fixture)


def argv(csv, out, steps=4, *extra):
    return train_argv(csv, out, steps, *extra)


def all_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tmp_path, csv_task, capsys):
    out = tmp_path / "run"
    assert main(argv(csv_task, out)) == 0
    capsys.readouterr()
    return out


# -- --resume of a finished run ----------------------------------------------------------------------------
def test_resuming_a_finished_run_reports_it_and_rewrites_nothing(finished, csv_task, capsys):
    before = all_digests(finished)
    saved = json.loads((finished / "metrics.json").read_text())
    assert main(argv(csv_task, finished, 4, "--resume", str(finished))) == 0
    out = capsys.readouterr().out
    assert f"the run in {finished} is already finished (4 steps)" in out, out
    assert f"accuracy {saved['accuracy']:.4f}" in out, out
    assert all_digests(finished) == before, "a finished run's files changed"


def test_resuming_a_finished_run_for_more_steps_trains_on(finished, csv_task, capsys):
    assert main(argv(csv_task, finished, 6, "--resume", str(finished))) == 0
    metrics = json.loads((finished / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["train_loss"] == metrics["train_loss"]      # not NaN


# -- a folder holding another run ---------------------------------------------------------------------------
def test_a_fresh_run_into_a_used_folder_is_refused_and_changes_nothing(finished, csv_task, capsys):
    before = all_digests(finished)
    assert main(argv(csv_task, finished, 2)) == 2
    line = error_line(capsys)
    assert f"--out {finished} already holds another run" in line and "--overwrite" in line, line
    assert all_digests(finished) == before


def test_overwrite_removes_the_old_run_first(finished, csv_task, capsys):
    (finished / "notes.txt").write_text("mine")
    assert main(argv(csv_task, finished, 2, "--overwrite")) == 0
    steps = sorted(p.name for p in (finished / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert steps == ["step-0000002"], "the old run's checkpoints survived"
    assert (finished / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    assert json.loads((finished / "metrics.json").read_text())["steps"] == 2
    assert (finished / "notes.txt").read_text() == "mine", "files that are not the run's are kept"


def test_overwrite_with_bad_input_keeps_the_old_run(finished, csv_task, capsys):
    before = all_digests(finished)
    missing_task = csv_task.parent / "missing.csv"
    assert main(argv(missing_task, finished, 2, "--overwrite")) == 2
    assert "missing.csv" in error_line(capsys)
    assert all_digests(finished) == before, "--overwrite removed the old run before the new one could start"


# -- --out checked before training ---------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["an existing file", "a path under a file"])
def test_out_that_cannot_be_a_folder_is_refused_before_training(where, tmp_path, csv_task, capsys, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = blocker if where == "an existing file" else blocker / "run"
    monkeypatch.setattr("memtune.train.load_model", lambda *a, **k: pytest.fail("the model loaded before --out was checked"))
    assert main(argv(csv_task, out)) == 2
    line = error_line(capsys)
    assert f"--out {out}" in line and ("existing file" in line or "is a file" in line), line
    assert blocker.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any permission bits")
def test_out_in_an_unwritable_folder_is_refused(tmp_path, csv_task, capsys):
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    assert main(argv(csv_task, locked / "run")) == 2
    assert "no write permission" in error_line(capsys)


# -- the lock -------------------------------------------------------------------------------------------
def test_a_live_lock_stops_a_second_run(tmp_path, csv_task, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(f"{holder.pid} {socket.gethostname()}\n")
        assert main(argv(csv_task, out)) == 2
        line = error_line(capsys)
        assert f"another memtune run (pid {holder.pid}" in line and f"--out {out}" in line, line
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_removed_at_exit(tmp_path, csv_task, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK_NAME).write_text(f"{dead.pid} {socket.gethostname()}\n")
    assert main(argv(csv_task, out, 2)) == 0
    assert not (out / LOCK_NAME).exists()
    assert (out / "metrics.json").exists()


def test_two_concurrent_runs_on_one_folder_one_is_refused(tmp_path, csv_task):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "memtune", *argv(csv_task, out, 200)]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        second = subprocess.run(cmd, capture_output=True, text=True)
        assert second.returncode == 2, second.stderr[-2000:]
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"another memtune run (pid {first.pid}" in lines[0], lines
    finally:
        first.kill()
        first.wait()


# -- permissions ----------------------------------------------------------------------------------------
def test_written_files_get_the_users_umask(tmp_path, csv_task, capsys):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(argv(csv_task, out, 2)) == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"metrics.json", "adapter_model.safetensors", "adapter_config.json", "latest"}
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o644}, modes

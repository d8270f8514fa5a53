"""Training checkpoints that survive kills and full disks, with no pickles.

    OUT/checkpoints/step-000120/
        adapter_model.safetensors + adapter_config.json   trainable weights (as `save_pretrained`)
        optimizer.safetensors                              optimizer state tensors, "state.<i>.<key>"
        rng.safetensors                                    torch CPU (and CUDA) generator states
        trainer_state.json                                 step, epoch, batch position, scheduler,
                                                           optimizer param groups and scalars
        selected.safetensors                               --select-best: the best epoch's trainable weights
    OUT/checkpoints/latest                                 name of the newest complete checkpoint

A checkpoint is written into a temporary folder, every file fsynced, then renamed into place; only
then does `latest` move (itself written atomically). A failure in the middle leaves the previous
checkpoint and `latest` untouched.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import _fsync_dir, disk_full, file_mode, is_disk_full, write_text
from .checkpoint import (CheckpointError, check_compatible, load_weights, read_adapter_config, save_adapter,
                         tensor_bytes)

KEEP = 2
SELECTED_NAME = "selected.safetensors"


def _flatten_optimizer(state_dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, st in state_dict["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = v
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors, meta) -> dict:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for name, v in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_checkpoint(out_dir, model, optimizer, scheduler, progress: dict,
                             selected: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step-<step>` atomically and point `latest` at it. Returns its folder. `selected`: the
    trainable tensors of the best epoch so far (`memtune.selection`), kept with the checkpoint.

    On any failure (a full disk included: safetensors reports it as its own SafetensorError) the temporary
    folder is removed and the previous checkpoint and `latest` are left as they were."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{progress['step']:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = s
    needed = tensor_bytes(dict(model.trainable_named_parameters())) + tensor_bytes(opt_tensors) + tensor_bytes(rng)
    needed += tensor_bytes(selected or {})
    try:
        save_adapter(model, tmp)
        if selected is not None:
            save_file(selected, str(tmp / SELECTED_NAME))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"progress": progress, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=_json_default))
        mode = file_mode()
        for f in tmp.iterdir():
            os.chmod(f, mode)                     # safetensors writes 0600: give the user's umask instead
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_text(root / "latest", name + "\n")
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e):
            if (root / name).exists() and _pointer(root) != name:
                shutil.rmtree(root / name, ignore_errors=True)   # renamed in, but `latest` could not move
            kept = latest_checkpoint(out_dir)
            raise disk_full(root, f"checkpoint {name}", needed,
                            f"the previous checkpoint is kept ({kept or 'none written yet'})") from None
        raise
    _prune(root, keep=KEEP)
    return final


def _json_default(v):
    if isinstance(v, torch.Tensor):
        return v.tolist()
    raise TypeError(f"cannot store {type(v).__name__} in trainer_state.json")


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _pointer(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip()
    except OSError:
        return None


def latest_checkpoint(path) -> Path | None:
    """The newest complete checkpoint under a run folder (or the folder itself if it is one)."""
    path = Path(path)
    if (path / "trainer_state.json").exists():
        return path
    root = path / "checkpoints"
    pointer = root / "latest"
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if (cand / "trainer_state.json").exists():
            return cand
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


def finished_run_metrics(resume, total_steps: int, model) -> dict | None:
    """The saved metrics of the run `resume` names if it already finished `total_steps` (or more), else None.

    metrics.json is written last, so its presence marks a finished run. Its adapter must fit `model`
    (CheckpointError otherwise)."""
    if not resume:
        return None
    path = Path(resume) / "metrics.json"
    if not path.is_file():
        return None
    metrics = _read(path, lambda f: json.loads(f.read_text(encoding="utf-8")))
    if not isinstance(metrics, dict) or not isinstance(metrics.get("steps"), int):
        raise CheckpointError(f"{path}: not the metrics file memtune train writes (no step count)")
    if metrics["steps"] < total_steps:
        return None
    check_compatible(read_adapter_config(resume), model)
    return {**metrics, "already_finished": True}


def _read(path: Path, reader):
    try:
        return reader(path)
    except (OSError, ValueError, SafetensorError) as e:       # JSONDecodeError, UnicodeDecodeError: ValueError
        raise CheckpointError(f"{path}: missing, unreadable or truncated ({e}); resume from an earlier "
                              "checkpoint folder (checkpoints/step-*) or start again") from None


def read_selected(path) -> dict[str, torch.Tensor] | None:
    """The best epoch's tensors the newest checkpoint under `path` holds (None if it holds none)."""
    ckpt = latest_checkpoint(path)
    if ckpt is None or not (ckpt / SELECTED_NAME).exists():
        return None
    return _read(ckpt / SELECTED_NAME, lambda f: load_file(str(f)))


def load_training_checkpoint(path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG; returns the saved progress dict."""
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"{path}: no complete training checkpoint to resume from "
                              "(expected checkpoints/step-*/trainer_state.json)")
    check_compatible(read_adapter_config(ckpt), model)
    # Read every file before changing anything, so a damaged checkpoint is reported and nothing half-loaded.
    state = _read(ckpt / "trainer_state.json", lambda f: json.loads(f.read_text(encoding="utf-8")))
    opt = _read(ckpt / "optimizer.safetensors", lambda f: load_file(str(f)))
    rng = _read(ckpt / "rng.safetensors", lambda f: load_file(str(f)))
    load_weights(model, ckpt)
    try:
        optimizer.load_state_dict(_unflatten_optimizer(opt, state["optimizer"]))
    except ValueError as e:                  # another parameter-group layout (e.g. saved by an older memtune)
        raise CheckpointError(f"{ckpt}: its optimizer state does not fit this run's optimizer ({e}); start a "
                              f"fresh run, or resume with the memtune version that wrote it") from None
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return state["progress"]

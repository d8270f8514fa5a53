"""Training checkpoints that survive kills and full disks, with no pickles.

    OUT/checkpoints/step-000120/
        adapter_model.safetensors + adapter_config.json   trainable weights (as `save_pretrained`)
        optimizer.safetensors                              optimizer state tensors, "state.<i>.<key>"
        rng.safetensors                                    torch CPU (and CUDA) generator states
        trainer_state.json                                 step, epoch, batch position, scheduler,
                                                           optimizer param groups and scalars
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

from .atomic import DiskFullError, _fsync_dir, write_text
from .checkpoint import CheckpointError, check_compatible, load_weights, read_adapter_config, save_adapter

KEEP = 2


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


def save_training_checkpoint(out_dir, model, optimizer, scheduler, progress: dict) -> Path:
    """Write checkpoint `step-<step>` atomically and point `latest` at it. Returns its folder."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{progress['step']:07d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_adapter(model, tmp)
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"cuda.{i}"] = s
        save_file(rng, str(tmp / "rng.safetensors"))
        state = {"progress": progress, "optimizer": opt_meta, "scheduler": scheduler.state_dict()}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1, default=_json_default))
        for f in tmp.iterdir():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_text(root / "latest", name + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == 28 or isinstance(e, DiskFullError):
            kept = latest_checkpoint(out_dir) or "none written yet"
            raise DiskFullError(28, f"no space left on the device while writing checkpoint {name}; "
                                    f"the previous checkpoint is kept ({kept})") from e
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


def _read(path: Path, reader):
    try:
        return reader(path)
    except (OSError, ValueError, SafetensorError) as e:       # JSONDecodeError, UnicodeDecodeError: ValueError
        raise CheckpointError(f"{path}: missing, unreadable or truncated ({e}); resume from an earlier "
                              "checkpoint folder (checkpoints/step-*) or start again") from None


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
    optimizer.load_state_dict(_unflatten_optimizer(opt, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return state["progress"]

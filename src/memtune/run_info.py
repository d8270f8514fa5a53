"""Facts recorded beside every result: package versions, git commit, machine."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch


def versions() -> dict[str, str]:
    import accelerate
    import peft
    import safetensors
    import transformers

    from .version import __version__

    return {"memtune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "safetensors": safetensors.__version__,
            "python": platform.python_version()}


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, str | int]:
    import os

    info: dict[str, str | int] = {"platform": platform.platform(), "cpu_count": os.cpu_count() or 0,
                                  "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda or ""
    return info

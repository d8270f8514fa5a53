"""Data-parallel training: DDP gradients equal single-process gradients on the concatenated batch.

Two CPU processes (gloo, rendezvous through a file) wrap each method with the training loop's own
Accelerator (`memtune.train.make_accelerator`), each backpropagates the loss of its half of a batch,
and the all-reduced gradients are compared with one process's gradients on the whole batch. Dropout is
off (`model.eval()`; backprop still runs), so the comparison is exact up to float rounding. One real
`memtune train --num-processes 2` run checks the launcher end to end.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import memtune

from .conftest import spawn_with_timeout

WORLD = 2
BATCH = 8                    # 4 examples per process
LENGTH = 12
# Every method that supports the BERT family (all of them today); at least lora, lst, dtl and meft1.
METHODS = sorted(name for name, cls in memtune.METHODS.items() if "bert" in cls.supported_families())
REQUIRED = ("lora", "lst", "dtl", "meft1")


def build_case(method: str):
    """A wrapped tiny-bert whose every trainable tensor is non-zero (so no gradient is trivially 0)."""
    torch.manual_seed(0)
    model = memtune.wrap(memtune.load_model("tiny-bert"), method, num_labels=3)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()                      # dropout off; gradients still flow


def full_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 60, (BATCH, LENGTH), generator=g)
    lengths = torch.tensor([12, 7, 10, 5, 12, 9, 4, 11])     # padding differs between rows and halves
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.arange(BATCH) % 3}


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of WORLD processes: DDP backward on this rank's half of the batch; writes its gradients."""
    from safetensors.torch import save_file

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from accelerate.utils import DistributedType

    from memtune.train import make_accelerator

    accelerator = make_accelerator()
    info = {"num_processes": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "backend": torch.distributed.get_backend(), "errors": {}}
    assert accelerator.distributed_type == DistributedType.MULTI_CPU
    full = full_batch()
    half = {k: v[rank * BATCH // WORLD:(rank + 1) * BATCH // WORLD] for k, v in full.items()}
    for method in METHODS:
        try:
            model = build_case(method)
            ddp = accelerator.prepare(model)
            info.setdefault("wrapped_in", type(ddp).__name__)
            accelerator.backward(ddp(**half).loss)
            grads = {n: p.grad.contiguous() for n, p in model.trainable_named_parameters() if p.grad is not None}
            save_file(grads, os.path.join(out_dir, f"{method}.rank{rank}.safetensors"))
        except Exception as e:                      # recorded, so one method's failure names itself
            info["errors"][method] = f"{type(e).__name__}: {e}"
    # MEFT picks its reversible segments from the first batch each rank sees, so ranks can disagree:
    # run meft1 with a different segmentation on each rank (one span of 4 layers vs four of 1).
    model = build_case("meft1")
    model.segments = [[0, 1, 2, 3]] if rank == 0 else [[0], [1], [2], [3]]
    ddp = accelerator.prepare(model)                 # held: DDP's backward needs the wrapper alive
    accelerator.backward(ddp(**half).loss)
    grads = {n: p.grad.contiguous() for n, p in model.trainable_named_parameters() if p.grad is not None}
    save_file(grads, os.path.join(out_dir, f"meft1-mixed.rank{rank}.safetensors"))
    with open(os.path.join(out_dir, f"info.rank{rank}.json"), "w") as f:
        json.dump(info, f)
    torch.distributed.barrier()  # no rank tears the group down while another still reduces
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    spawn_with_timeout(_ddp_worker, (str(out / "rendezvous"), str(out)), WORLD)
    info = [json.loads((out / f"info.rank{r}.json").read_text()) for r in range(WORLD)]
    return out, info


def test_processes_form_a_gloo_ddp_group_through_the_training_loops_accelerator(ddp_run):
    _, info = ddp_run
    for r in info:
        assert r["num_processes"] == WORLD and r["backend"] == "gloo"
        assert r["distributed_type"].endswith("MULTI_CPU")
        assert r["wrapped_in"] == "DistributedDataParallel"


def test_the_required_methods_are_registered():
    missing = [m for m in REQUIRED if m not in METHODS]
    assert not missing, f"methods not importable yet: {missing}"


@pytest.mark.parametrize("method", METHODS)
def test_ddp_gradients_equal_single_process_gradients_on_the_whole_batch(ddp_run, method):
    from safetensors.torch import load_file

    out, info = ddp_run
    for r in info:
        assert method not in r["errors"], r["errors"][method]
    ranks = [load_file(str(out / f"{method}.rank{r}.safetensors")) for r in range(WORLD)]

    model = build_case(method)
    model(**full_batch()).loss.backward()
    ref = {n: p.grad for n, p in model.trainable_named_parameters() if p.grad is not None}
    assert ref, "no trainable tensor received a gradient"
    for r, grads in enumerate(ranks):
        assert grads.keys() == ref.keys(), f"rank {r}: gradients for different tensors"
        for name, g in ref.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-4, msg=lambda m: f"rank {r} {name}: {m}")
    # A half batch alone gives other gradients: the comparison above can only pass if DDP reduced them.
    model.zero_grad()
    model(**{k: v[:BATCH // WORLD] for k, v in full_batch().items()}).loss.backward()
    assert any(not torch.allclose(p.grad, ref[n], atol=1e-5) for n, p in model.trainable_named_parameters()
               if p.grad is not None)


def test_meft_ranks_with_different_reversible_segments_still_reduce_to_the_full_batch_gradient(ddp_run):
    """Segmentation changes only the reconstruction error: gradients agree to that error (~1e-7 here)."""
    from safetensors.torch import load_file

    out, _ = ddp_run
    ranks = [load_file(str(out / f"meft1-mixed.rank{r}.safetensors")) for r in range(WORLD)]
    model = build_case("meft1")
    model(**full_batch()).loss.backward()
    for r, grads in enumerate(ranks):
        assert grads.keys() == {n for n, p in model.trainable_named_parameters() if p.grad is not None}
        for name, p in model.trainable_named_parameters():
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-3, msg=lambda m: f"rank {r} {name}: {m}")


def test_train_with_two_processes_end_to_end(tmp_path):
    csv = tmp_path / "task.csv"
    rows = [f"{'good great fine' if i % 2 else 'bad awful poor'} movie {i},{i % 2}" for i in range(40)]
    csv.write_text("text,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "memtune", "train", "--model", "tiny-bert", "--task", f"csv:{csv}",
                           "--method", "lora", "--max-steps", "3", "--batch-size", "4", "--max-length", "32",
                           "--test-limit", "8", "--no-progress", "--checkpoint-every", "2", "--out", str(out),
                           "--num-processes", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 3
    assert proc.stdout.count("lora: accuracy") == 1, "only the main process reports"
    model = memtune.load("tiny-bert", out)
    assert model.num_labels == 2
    assert (out / "checkpoints" / "step-0000002" / "trainer_state.json").exists()


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_the_training_loop_refuses_sharded_setups_it_would_save_wrongly(kind, tmp_path, monkeypatch, capsys):
    """An accelerate config choosing FSDP/DeepSpeed (GPU-only in Accelerate, so faked here) gets a clear
    error pointing to MemtuneTrainer, instead of adapters saved from parameter shards."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    import memtune.train
    from memtune.cli import main

    monkeypatch.setattr(memtune.train, "make_accelerator",
                        lambda precision="fp32": SimpleNamespace(distributed_type=DistributedType[kind]))
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\n" + "".join(f"w {i},{i % 2}\n" for i in range(20)))
    out = tmp_path / "out"
    code = main(["train", "--model", "tiny-bert", "--task", f"csv:{csv}", "--max-steps", "1", "--no-progress",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"not with {kind}" in err[0] and "MemtuneTrainer" in err[0], err
    assert not out.exists()

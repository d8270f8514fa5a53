"""Faults during training and loading: NaN/inf guards, a full disk mid-checkpoint, damaged or foreign
checkpoints, unsupported model families. Each is reported clearly and loses no earlier checkpoint."""
import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import memtune
from memtune.checkpoint import CheckpointError
from memtune.cli import main
from memtune.methods import ConfigError, MemtuneModel


@pytest.fixture
def csv_task(tmp_path):
    p = tmp_path / "task.csv"
    rows = [f"{'good great fine' if i % 2 else 'bad awful poor'} movie {i},{i % 2}" for i in range(40)]
    p.write_text("text,label\n" + "\n".join(rows) + "\n")
    return p


def train_argv(csv, out, steps=6, *extra):
    return ["train", "--model", "tiny-bert", "--task", f"csv:{csv}", "--method", "lora", "--max-steps", str(steps),
            "--batch-size", "4", "--max-length", "32", "--test-limit", "8", "--checkpoint-every", "2", "--seed", "1",
            "--no-progress", "--out", str(out), *extra]


def error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memtune: error:"), err
    return err[0]


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def assert_not_finished(out: Path):
    assert not (out / "metrics.json").exists() and not (out / "adapter_model.safetensors").exists()


def assert_no_temporaries(out: Path):
    left = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not left, f"temporary files left behind: {left}"


# -- NaN / inf ----------------------------------------------------------------------------------------
class _NaNGradient(torch.autograd.Function):
    """Identity forward (the loss stays finite), NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


POISON = {
    "nan loss": (lambda loss: loss * float("nan"), "loss became nan"),
    "inf loss": (lambda loss: loss + float("inf"), "loss became inf"),
    "nan gradient, finite loss": (_NaNGradient.apply, "gradient norm became nan"),
}


def poison_training_step(monkeypatch, step: int, how):
    """Patch every wrapped model's forward so that the `step`-th training forward returns a poisoned loss."""
    original = MemtuneModel.forward
    calls = {"n": 0}

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == step:
                out.loss = how(out.loss)
        return out

    monkeypatch.setattr(MemtuneModel, "forward", forward)


@pytest.mark.parametrize("case", sorted(POISON))
def test_non_finite_training_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        case, tmp_path, csv_task, monkeypatch, capsys):
    how, expected = POISON[case]
    out = tmp_path / "run"
    poison_training_step(monkeypatch, 5, how)
    assert main(train_argv(csv_task, out)) == 1
    line = error_line(capsys)
    assert expected in line and "at step 5" in line and "step-0000004" in line, line
    assert_not_finished(out)
    ckpt = out / "checkpoints" / "step-0000004"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000004"
    model = memtune.load("tiny-bert", ckpt)
    assert all(torch.isfinite(p).all() for _, p in model.trainable_named_parameters())

    monkeypatch.undo()                                   # the cause is gone: the run resumes and finishes
    assert main(train_argv(csv_task, out, 6, "--resume", str(out))) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


# -- a full disk --------------------------------------------------------------------------------------
def _enospc(path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _safetensors_full(path):
    """What safetensors' own writer raises on a full disk: its SafetensorError, not an OSError."""
    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


DISK_ERRORS = {"OSError ENOSPC": _enospc, "SafetensorError": _safetensors_full}


DISK_FULL_AT = {
    # where the write fails: (module attribute patched, predicate on the path being written)
    "adapter weights of checkpoint 4": ("memtune.checkpoint.save_file", lambda p: "step-0000004" in p),
    "optimizer state of checkpoint 4": ("memtune.resume.save_file",
                                        lambda p: "step-0000004" in p and p.endswith("optimizer.safetensors")),
    "final adapter": ("memtune.checkpoint.save_file", lambda p: "checkpoints" not in p),
}


@pytest.mark.parametrize("error", sorted(DISK_ERRORS))
@pytest.mark.parametrize("where", sorted(DISK_FULL_AT) + ["latest pointer for checkpoint 4"])
def test_a_full_disk_is_reported_and_loses_no_earlier_checkpoint(where, error, tmp_path, csv_task, monkeypatch,
                                                                 capsys):
    if where.startswith("latest pointer") and error == "SafetensorError":
        pytest.skip("the pointer is a text file: only the OS reports its full disk")
    import memtune.atomic
    import memtune.resume

    out = tmp_path / "run"
    seen = {}
    previous = out / "checkpoints" / "step-0000002"

    if where.startswith("latest pointer"):
        def write_text(target, text):                  # the real atomic writer, failing half-way through
            if "step-0000004" not in text:
                return memtune.atomic.write_text(target, text)
            seen["before"] = tree_digest(previous)
            with memtune.atomic.atomic_path(target) as tmp:
                tmp.write_text(text[:3])
                raise _enospc(tmp)
        monkeypatch.setattr(memtune.resume, "write_text", write_text)
    else:
        target, hit = DISK_FULL_AT[where]
        module, name = target.rsplit(".", 1)
        real = getattr(__import__(module, fromlist=[name]), name)

        def save(tensors, path, *args, **kwargs):
            if not hit(str(path)):
                return real(tensors, path, *args, **kwargs)
            seen["before"] = tree_digest(out / "checkpoints" / "step-0000006" if where == "final adapter"
                                         else previous)
            Path(path).write_bytes(b"\0" * 64)            # a partly written file, then the disk is full
            raise DISK_ERRORS[error](path)
        monkeypatch.setattr(module + "." + name, save)

    assert main(train_argv(csv_task, out)) == 2
    line = error_line(capsys)
    assert "no space left" in line and "needs about" in line, line
    folder = out if where == "final adapter" else out / "checkpoints"
    assert f"in {folder} while writing" in line, line
    assert_not_finished(out)
    assert_no_temporaries(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left in the run folder"
    assert "before" in seen, "the fault was never triggered"
    kept = "step-0000006" if where == "final adapter" else "step-0000002"
    assert kept in line, line
    assert (out / "checkpoints" / "latest").read_text().strip() == kept
    assert tree_digest(out / "checkpoints" / kept) == seen["before"], "the previous checkpoint changed"
    memtune.load("tiny-bert", out / "checkpoints" / kept)


def _blocks(folder: Path) -> int:
    """Bytes the files under `folder` take on a tmpfs (whole 4 KiB pages per file)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a tmpfs of a given size (needs root / CAP_SYS_ADMIN; the test skips where it cannot)."""
    import subprocess

    mounted = []

    def mount(size_bytes: int) -> Path:
        where = tmp_path / "tmpfs"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)


def test_a_really_full_disk_keeps_the_previous_checkpoint(tmp_path, csv_task, small_tmpfs, monkeypatch, capsys):
    """Room for one checkpoint and a half: step 2 fits, step 4 does not. No fault injection: the disk is full."""
    import memtune.train

    reference = tmp_path / "reference"
    assert main(train_argv(csv_task, reference, 2)) == 0
    one = _blocks(reference / "checkpoints")
    disk = small_tmpfs(one + one // 2 + 4096)
    out = disk / "run"
    seen = {}
    real = memtune.train.save_training_checkpoint

    def spy(out_dir, model, optimizer, scheduler, progress, **kw):  # record step 2 as it was before step 4 began
        if progress["step"] == 4:
            seen["before"] = tree_digest(out / "checkpoints" / "step-0000002")
        return real(out_dir, model, optimizer, scheduler, progress, **kw)

    monkeypatch.setattr(memtune.train, "save_training_checkpoint", spy)
    capsys.readouterr()
    assert main(train_argv(csv_task, out)) == 2
    line = error_line(capsys)
    assert f"no space left on the device in {out / 'checkpoints'} while writing checkpoint step-0000004" in line
    assert "needs about" in line and "step-0000002" in line, line
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000002"
    assert tree_digest(out / "checkpoints" / "step-0000002") == seen["before"]
    assert_no_temporaries(out)
    assert_not_finished(out)
    memtune.load("tiny-bert", out / "checkpoints" / "step-0000002")


# -- loading refuses pickles, damaged files and tensors that do not fit ------------------------------------
@pytest.fixture
def adapter(tmp_path):
    torch.manual_seed(0)
    model = memtune.wrap(memtune.load_model("tiny-bert"), "lora", num_labels=2)
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return folder


def rewrite_tensors(folder, edit):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_a_folder_with_only_pickled_weights_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        memtune.load("tiny-bert", folder)


def test_pickled_adapter_weights_beside_a_valid_config_are_refused(adapter):
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="safetensors only"):
        memtune.load("tiny-bert", adapter)


def test_shape_mismatch_is_refused_naming_the_tensor(adapter):
    name = "head.weight"
    rewrite_tensors(adapter, lambda t: t.__setitem__(name, torch.zeros(5, 64)))
    with pytest.raises(CheckpointError, match=r"head\.weight has shape \(5, 64\), the model expects \(2, 64\)"):
        memtune.load("tiny-bert", adapter)


def test_missing_and_unexpected_tensors_are_refused(adapter):
    rewrite_tensors(adapter, lambda t: t.pop("head.bias"))
    with pytest.raises(CheckpointError, match=r"missing \['head\.bias'\]"):
        memtune.load("tiny-bert", adapter)
    rewrite_tensors(adapter, lambda t: t.update({"head.bias": torch.zeros(2), "extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected \['extra\.weight'\]"):
        memtune.load("tiny-bert", adapter)


@pytest.mark.parametrize("keep", [0, 7, 8, 100, -1])
def test_truncated_safetensors_is_a_clear_checkpoint_error(adapter, keep):
    path = adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        memtune.load("tiny-bert", adapter)


def test_a_config_naming_another_method_does_not_load_the_weights(adapter):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "method": "ia3", "config": {}}))
    with pytest.raises(CheckpointError, match="tensors do not match the config"):
        memtune.load("tiny-bert", adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "method": "prefix-tuning"}))
    with pytest.raises(CheckpointError, match="unknown method 'prefix-tuning'"):
        memtune.load("tiny-bert", adapter)


def test_resume_refuses_a_checkpoint_with_a_damaged_optimizer_file(tmp_path, csv_task, capsys):
    out = tmp_path / "run"
    assert main(train_argv(csv_task, out, 2)) == 0
    capsys.readouterr()
    opt = out / "checkpoints" / "step-0000002" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:40])
    assert main(train_argv(csv_task, tmp_path / "again", 4, "--resume", str(out))) == 2
    line = error_line(capsys)
    assert "optimizer.safetensors" in line and "truncated" in line, line
    assert not (tmp_path / "again").exists()


# -- a side-network method on a family it does not support --------------------------------------------
@pytest.mark.parametrize("method,model,family,reason", [
    ("dtl", "tiny-t5", "t5", "it is not one bidirectional encoder stack"),
    ("dtl+", "tiny-t5", "t5", "it is not one bidirectional encoder stack"),
    ("meft1", "tiny-swin", "swin", "its width doubles at each patch merging between stages"),
    ("meft2", "tiny-swin", "swin", "its width doubles at each patch merging between stages"),
    ("meft3", "tiny-gpt-neox", "gpt_neox", "parallel residual (use_parallel_residual)")])
def test_unsupported_family_says_why_and_names_the_supported_ones(method, model, family, reason):
    families = memtune.METHODS[method].supported_families()
    assert family not in families
    with pytest.raises(ConfigError) as e:
        memtune.wrap(memtune.load_model(model), method, num_labels=2)
    message = str(e.value)
    assert message.startswith(f"method {method!r} does not support the {family} family ("), message
    assert reason in message and message.endswith(f"); supported families: {', '.join(families)}"), message


def test_a_model_that_lacks_a_capability_of_its_family_says_its_own_reason():
    # OPT-350m's shape: a 32-wide embedding and LM head around 64-wide blocks (project_in / project_out).
    from transformers import AutoModelForCausalLM

    from memtune.backbones.opt import OPTBackbone

    config = OPTBackbone.tiny_configs()["tiny-opt"]
    config.word_embed_proj_dim = 32
    with pytest.raises(ConfigError, match=r"family \(its embedding and LM head are 32 wide \(project_in / "
                                          r"project_out\), not the blocks' 64\); supported families"):
        memtune.wrap(AutoModelForCausalLM.from_config(config), "lst")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_an_adapter_with_non_finite_weights_is_refused_naming_the_tensor(adapter, value):
    name = sorted(n for n in load_file(str(adapter / "adapter_model.safetensors")) if "lora_A" in n)[0]
    rewrite_tensors(adapter, lambda t: t[name].view(-1).__setitem__(3, value))
    with pytest.raises(CheckpointError, match=rf"tensor {name.replace('.', '[.]')} holds 1 NaN/inf value\(s\)"):
        memtune.load("tiny-bert", adapter)


def test_eval_of_an_all_nan_adapter_exits_2(adapter, tmp_path, capsys):
    rewrite_tensors(adapter, lambda t: [v.fill_(float("nan")) for v in t.values()])
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(20)))
    code = main(["eval", "--model", "tiny-bert", "--adapter", str(adapter), "--task", f"csv:{csv}", "--no-progress"])
    assert code == 2
    assert "NaN/inf value(s)" in error_line(capsys)


def test_resume_refuses_an_optimizer_state_of_another_layout(tmp_path):
    # A checkpoint written with one parameter group (e.g. by an older memtune) and a run that now has two.
    import memtune
    from memtune.resume import CheckpointError, load_training_checkpoint, save_training_checkpoint

    model = memtune.wrap(memtune.load_model("tiny-bert"), "lora", num_labels=2)
    params = [p for _, p in model.trainable_named_parameters()]
    one = torch.optim.AdamW(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(one, lambda s: 1.0)
    ckpt = save_training_checkpoint(tmp_path, model, one, sched, {"step": 1})
    two = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}], lr=1e-3)
    with pytest.raises(CheckpointError, match="optimizer state does not fit this run's optimizer"):
        load_training_checkpoint(ckpt, model, two, torch.optim.lr_scheduler.LambdaLR(two, lambda s: 1.0))

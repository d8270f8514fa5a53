"""Training end to end on tiny models: metrics, saved adapter, `eval` reproduces the accuracy."""
import json

import torch

from memtune.cli import main
from memtune.train import TrainArgs, train


def tiny_args(tmp_path, **kw):
    base = dict(model="tiny-bert", task="csv:" + str(csv_task(tmp_path)), method="lora", out=str(tmp_path / "run"),
                max_steps=6, batch_size=4, max_length=32, progress=False, seed=3)
    base.update(kw)
    return TrainArgs(**base)


def csv_task(tmp_path):
    p = tmp_path / "task.csv"
    if not p.exists():
        rows = [f"{'good great fine' if i % 2 else 'bad awful poor'} movie {i},{i % 2}" for i in range(60)]
        p.write_text("text,label\n" + "\n".join(rows) + "\n")
    return p


def test_train_writes_metrics_and_adapter_and_eval_reproduces_accuracy(tmp_path, capsys):
    m = train(tiny_args(tmp_path, measure_memory=True))
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    for key in ("method", "trainable_params", "peak_bytes", "activation_peak_bytes", "step_time_s", "accuracy",
                "versions", "settings"):
        assert key in saved
    assert (run / "adapter_model.safetensors").exists() and (run / "adapter_config.json").exists()
    assert main(["eval", "--model", "tiny-bert", "--adapter", str(run), "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["accuracy"] == m["accuracy"]


def test_memory_step_of_a_trunk_cached_method_gets_example_ids(tmp_path):
    # The memory run collates its own padded batch; a method with a trunk cache needs example ids there too
    # (it measures the step that fills the cache), as the training loader gives them.
    m = train(tiny_args(tmp_path, method="lst", options={"cache_trunk": "true", "trunk_dropout": "false"},
                        measure_memory=True, epochs=2, max_steps=None))
    assert m["peak_bytes"] > 0 and m["activation_peak_bytes"] > 0
    assert m["accuracy"] is not None


def test_memory_step_steps_the_batch_it_is_given(tmp_path):
    # A benchmark's own batch (real text of an exact shape) replaces the padded training examples; the step then
    # trains on it: the loss is finite and the trained weights move.
    from memtune.memory.measure import training_step
    from memtune.train import memory_step

    ids = torch.arange(2 * 16).view(2, 16) % 50 + 5
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model, stepped, optimizer, autocast = memory_step(
        tiny_args(tmp_path, model="tiny-llama", objective="causal-lm", max_length=16), batch)
    assert stepped["input_ids"].shape == (2, 16) and torch.equal(stepped["example_id"], torch.arange(2))
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    loss = training_step(model, stepped, optimizer, autocast)
    assert torch.isfinite(loss)
    after = [p for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    train(tiny_args(tmp_path, out=str(tmp_path / "a")))
    train(tiny_args(tmp_path, out=str(tmp_path / "b")))
    a = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_run(tmp_path):
    """SIGKILL a training process in the middle, resume it, and compare with a run that was never stopped."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    csv = csv_task(tmp_path)
    common = ["--model", "tiny-bert", "--task", f"csv:{csv}", "--method", "lora", "--max-steps", "400",
              "--batch-size", "4", "--max-length", "32", "--seed", "3", "--no-progress", "--checkpoint-every", "10"]
    train_cmd = [sys.executable, "-m", "memtune", "train", *common]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd + ["--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step-0000020").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists(), "a killed run must not look finished"

    resume = subprocess.run(train_cmd + ["--out", str(killed), "--resume", str(killed)], capture_output=True, text=True)
    assert resume.returncode == 0, resume.stderr[-2000:]
    straight = subprocess.run(train_cmd + ["--out", str(tmp_path / "straight")], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]

    a = load_file(str(killed / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_causal_lm_training_reports_perplexity(tmp_path):
    m = train(tiny_args(tmp_path, model="tiny-llama", objective="causal-lm", max_steps=3, eval_before=True))
    assert m["perplexity"] > 1 and "accuracy" not in m
    # The untrained start is evaluated on the same test texts, and training changed the model.
    assert m["before"]["perplexity"] > 1 and m["before"]["perplexity"] != m["perplexity"]

"""A catalogue of malformed inputs for every verb: train, eval, compare and plan.

Each gives exactly one stderr line starting `memtune: error:`, exit code 2, no traceback, and writes nothing
that could be mistaken for a finished run. (tests/test_cli.py covers the basic `train` cases: unknown
model/task/method, malformed CSV, missing column, bad option values, modality, --max-length, batch 0.)
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from memtune.cli import main
from memtune.train import TrainArgs, train

from .conftest import has_package

BIG = str(10**9)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    f = {
        "ok": d / "ok.csv", "three": d / "three.csv", "empty": d / "empty.csv", "zero": d / "zero.jsonl",
        "one": d / "one.csv", "latin1": d / "latin1.csv", "latin1_jsonl": d / "latin1.jsonl",
    }
    f["ok"].write_text("text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} text {i},{i % 2}\n" for i in range(30)))
    f["three"].write_text("text,label\n" + "".join(f"sample {i},{i % 3}\n" for i in range(30)))
    f["empty"].write_text("text,label\n")
    f["zero"].write_bytes(b"")
    f["one"].write_text("text,label\n" + "".join(f"x {i},1\n" for i in range(10)))
    f["latin1"].write_bytes(b"text,label\n" + "".join(f"caf\xe9 {i},{i % 2}\n" for i in range(10)).encode("latin-1"))
    f["latin1_jsonl"].write_bytes("".join(f'{{"text": "caf\xe9 {i}", "label": {i % 2}}}\n'
                                          for i in range(10)).encode("latin-1"))
    # A finished lora run with checkpoints: the adapter that eval and --resume cases start from.
    f["run"] = d / "run"
    train(TrainArgs(model="tiny-bert", task=f"csv:{f['ok']}", method="lora", out=str(f["run"]), max_steps=2,
                    batch_size=4, max_length=32, test_limit=6, checkpoint_every=1, progress=False))
    return f


@pytest.fixture
def run_copy(files, tmp_path):
    """A fresh copy of the finished run, free to be damaged."""
    dst = tmp_path / "adapter"
    shutil.copytree(files["run"], dst)
    return dst


def check_one_clear_line(argv, capsys, expected, out=None):
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2, (code, captured.err[-2000:])
    assert len(err) == 1 and err[0].startswith("memtune: error:"), err
    assert expected in err[0], err[0]
    if out is not None:
        assert not Path(out).exists(), f"bad input wrote {sorted(p.name for p in Path(out).rglob('*'))}"
    return err[0]


def fmt(argv, files, **extra):
    return [a.format(**{k: str(v) for k, v in files.items()}, **extra) for a in argv]


# -- train --------------------------------------------------------------------------------------------
TRAIN = ["train", "--model", "tiny-bert", "--max-steps", "1", "--batch-size", "2", "--no-progress"]
TRAIN_CASES = {
    "empty csv (header only)": (["--task", "csv:{empty}"], "no data rows"),
    "zero-byte jsonl": (["--task", "jsonl:{zero}"], "JSONL file is empty"),
    "one-class dataset": (["--task", "csv:{one}"], "needs at least 2 classes"),
    "non-UTF-8 csv": (["--task", "csv:{latin1}"], "is not valid UTF-8: byte 0xe9"),
    "non-UTF-8 jsonl": (["--task", "jsonl:{latin1_jsonl}"], "is not valid UTF-8"),
    "batch size -1": (["--task", "csv:{ok}", "--batch-size", "-1"], "--batch-size must be between 1 and 65536"),
    "batch size 10**9": (["--task", "csv:{ok}", "--batch-size", BIG], "--batch-size must be between 1 and 65536"),
    "eval batch size 10**9": (["--task", "csv:{ok}", "--eval-batch-size", BIG], "--eval-batch-size must be between"),
    "warm-up share 1": (["--task", "csv:{ok}", "--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1), got 1.0"),
    "negative clip norm": (["--task", "csv:{ok}", "--grad-clip", "-1"],
                           "--grad-clip must be a finite norm >= 0 (0: no clipping), got -1.0"),
    "side network on an unsupported family": (["--model", "tiny-t5", "--task", "csv:{ok}", "--method", "dtl"],
                                              "does not support the t5 family (it is not one bidirectional "
                                              "encoder stack); supported families: bert, vit"),
    "resume: folder without checkpoints": (["--task", "csv:{ok}", "--resume", "{ok}"],
                                           "no complete training checkpoint"),
    "resume: checkpoint of another method": (["--task", "csv:{ok}", "--method", "ia3", "--resume", "{run}"],
                                             "checkpoint holds method 'lora', the model was built for 'ia3'"),
    "resume: task with another number of classes": (["--task", "csv:{three}", "--resume", "{run}"],
                                                    "checkpoint has a 2-class head, the model was built with a "
                                                    "3-class head"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_train(case, files, capsys, tmp_path):
    argv, expected = TRAIN_CASES[case]
    out = tmp_path / "out"
    check_one_clear_line(TRAIN + fmt(argv, files) + ["--out", str(out)], capsys, expected, out)


def test_train_resume_from_a_truncated_checkpoint(run_copy, files, capsys, tmp_path):
    weights = run_copy / "checkpoints" / "step-0000002" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "out"
    check_one_clear_line(TRAIN + ["--task", f"csv:{files['ok']}", "--resume", str(run_copy), "--out", str(out)],
                         capsys, "unreadable or truncated safetensors file", out)


# -- eval ---------------------------------------------------------------------------------------------
EVAL = ["eval", "--model", "tiny-bert", "--no-progress"]
EVAL_CASES = {
    "labels outside the head": (["--task", "csv:{three}"], "has classes ['0', '1', '2'], the adapter was trained "
                                                          "on ['0', '1']; ['2'] cannot be mapped"),
    "empty csv": (["--task", "csv:{empty}"], "no data rows"),
    "one-class dataset": (["--task", "csv:{one}"], "needs at least 2 classes"),
    "non-UTF-8 csv": (["--task", "csv:{latin1}"], "is not valid UTF-8"),
    "batch size 0": (["--batch-size", "0"], "--batch-size must be between 1 and 65536, got 0"),
    "batch size -1": (["--batch-size", "-1"], "--batch-size must be between 1 and 65536, got -1"),
    "batch size 10**9": (["--batch-size", BIG], f"--batch-size must be between 1 and 65536, got {BIG}"),
    "another base model": (["--model", "tiny-llama"], "checkpoint was made for base model 'tiny-bert'"),
}


@pytest.mark.parametrize("case", sorted(EVAL_CASES))
def test_eval(case, run_copy, files, capsys):
    argv, expected = EVAL_CASES[case]
    before = sorted(p.name for p in run_copy.iterdir())
    check_one_clear_line(EVAL + ["--adapter", str(run_copy)] + fmt(argv, files), capsys, expected)
    assert sorted(p.name for p in run_copy.iterdir()) == before


def _damage(kind: str, folder: Path) -> None:
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    weights = folder / "adapter_model.safetensors"
    if kind == "truncated safetensors":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "config of another method":
        cfg_path.write_text(json.dumps({**cfg, "method": "ia3", "config": {}}))
    elif kind == "unknown method in config":
        cfg_path.write_text(json.dumps({**cfg, "method": "prefix-tuning"}))
    elif kind == "config options of another method":
        cfg_path.write_text(json.dumps({**cfg, "method": "bitfit"}))
    elif kind == "config is not JSON":
        cfg_path.write_text("{method: lora")
    elif kind == "pickled weights only":
        weights.rename(folder / "pytorch_model.bin")
        cfg_path.unlink()
    elif kind == "metrics.json is damaged":
        (folder / "metrics.json").write_text('{"settings": {"task"')


DAMAGED = {
    "truncated safetensors": "unreadable or truncated safetensors file",
    "config of another method": "tensors do not match the config",
    "unknown method in config": "unknown method 'prefix-tuning'",
    "config options of another method": "bitfit: unknown option(s)",
    "config is not JSON": "adapter_config.json: not valid JSON",
    "pickled weights only": "memtune loads safetensors only",
    "metrics.json is damaged": "metrics.json: unreadable",
}


@pytest.mark.parametrize("kind", sorted(DAMAGED))
def test_eval_damaged_or_foreign_adapter(kind, run_copy, capsys):
    _damage(kind, run_copy)
    check_one_clear_line(EVAL + ["--adapter", str(run_copy)], capsys, DAMAGED[kind])


def test_eval_without_a_task_to_evaluate(run_copy, capsys):
    (run_copy / "metrics.json").unlink()
    check_one_clear_line(EVAL + ["--adapter", str(run_copy)], capsys, "--task is required")


@pytest.mark.skipif(not has_package("sklearn"), reason="the bundled digits task needs scikit-learn")
def test_eval_image_task_on_a_text_adapter(run_copy, capsys):
    check_one_clear_line(EVAL + ["--adapter", str(run_copy), "--task", "digits"], capsys, "holds image data")


# -- compare ------------------------------------------------------------------------------------------
COMPARE = ["compare", "--model", "tiny-bert", "--max-steps", "1", "--no-progress", "--methods", "lora,linear"]
COMPARE_CASES = {
    "empty csv": (["--task", "csv:{empty}"], "no data rows"),
    "one-class dataset": (["--task", "csv:{one}"], "needs at least 2 classes"),
    "non-UTF-8 csv": (["--task", "csv:{latin1}"], "is not valid UTF-8"),
    "batch size 0": (["--task", "csv:{ok}", "--batch-size", "0"], "--batch-size must be between 1 and 65536"),
    "batch size -1": (["--task", "csv:{ok}", "--batch-size", "-1"], "--batch-size must be between 1 and 65536"),
    "batch size 10**9": (["--task", "csv:{ok}", "--batch-size", BIG], "--batch-size must be between 1 and 65536"),
    "max length beyond positions": (["--task", "csv:{ok}", "--max-length", "4096"],
                                    "exceeds the model's 512 positions"),
    "modality mismatch": (["--task", "csv:{ok}", "--model", "tiny-vit"], "holds text data"),
    "malformed method spec": (["--task", "csv:{ok}", "--methods", "lora:r"], "options must be key=value"),
    # An unknown method or a bad option of one method is not shared input: it becomes that method's row
    # and the others still run (tests/test_compare.py).
}


@pytest.mark.parametrize("case", sorted(COMPARE_CASES))
def test_compare(case, files, capsys, tmp_path):
    argv, expected = COMPARE_CASES[case]
    out = tmp_path / "cmp"
    check_one_clear_line(COMPARE + fmt(argv, files) + ["--out", str(out), "--json", str(tmp_path / "r.json")],
                         capsys, expected, out)
    assert not (tmp_path / "r.json").exists()


# -- plan ---------------------------------------------------------------------------------------------
PLAN_CASES = [
    pytest.param(["--batch-size", "0"], "batch size must be >= 1, got 0", id="batch size 0"),
    pytest.param(["--batch-size", "-1"], "batch size must be >= 1, got -1", id="batch size -1"),
    pytest.param(["--model", "tiny-nope"], "unknown model 'tiny-nope'", id="unknown model"),
    pytest.param(["--methods", "prefix"], "unknown method 'prefix'", id="unknown method"),
    pytest.param(["--budget", "lots"], "--budget: cannot read 'lots'", id="unreadable budget"),
    pytest.param(["--max-length", "4096"], "4096", id="max length beyond positions"),
]


@pytest.mark.parametrize("argv, expected", PLAN_CASES)
def test_plan(argv, expected, capsys, tmp_path):
    out = tmp_path / "plan.json"
    try:
        check_one_clear_line(["plan", "--model", "tiny-bert", "--methods", "lora", *argv, "--json", str(out)],
                             capsys, expected, out)
    except NotImplementedError:
        pytest.skip("memtune plan is not implemented yet")


def test_plan_answers_an_absurd_batch_without_allocating_it(capsys, tmp_path):
    """`plan` runs on the meta device, so batch 10**9 is a question it can answer (it does not fit)."""
    try:
        code = main(["plan", "--model", "tiny-bert", "--methods", "lora", "--batch-size", BIG, "--budget", "80GiB"])
    except NotImplementedError:
        pytest.skip("memtune plan is not implemented yet")
    out = capsys.readouterr().out
    assert code == 0 and "Nothing fits in 80.00 GiB at batch 1000000000" in out, out


# -- the same through a real process: no traceback, exit code 2 -----------------------------------------
@pytest.mark.parametrize("verb", ["eval", "compare"])
def test_real_process_gives_one_line_and_exit_2(verb, run_copy, files, tmp_path):
    if verb == "eval":
        _damage("truncated safetensors", run_copy)
        argv = EVAL + ["--adapter", str(run_copy)]
    else:
        argv = COMPARE + ["--task", f"csv:{files['empty']}", "--out", str(tmp_path / "cmp")]
    proc = subprocess.run([sys.executable, "-m", "memtune", *argv], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memtune: error:"), lines
    assert not (tmp_path / "cmp").exists()


# -- a model that cannot be found: one line naming where it was looked for ----------------------------
MISSING_MODELS = {
    "relative path": ("./nope", ["no such local folder", "not a bundled alias", "tiny-bert"]),
    "absolute path": ("/abs/path/that/does/not/exist", ["no such local folder", "/abs/path/that/does/not/exist"]),
    "hub id offline": ("nosuch-org/nosuch-model", ["not a bundled alias", "not a local folder",
                                                   "hub id 'nosuch-org/nosuch-model'", "HF_HUB_OFFLINE=1"]),
}


@pytest.mark.parametrize("case", sorted(MISSING_MODELS))
@pytest.mark.parametrize("verb", ["train", "eval"])
def test_a_missing_model_names_what_was_looked_for(case, verb, files, run_copy, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    name, expected = MISSING_MODELS[case]
    out = tmp_path / "out"
    if verb == "train":
        argv = TRAIN + ["--model", name, "--task", f"csv:{files['ok']}", "--out", str(out)]
    else:
        argv = ["eval", "--model", name, "--adapter", str(run_copy), "--no-progress"]
    line = check_one_clear_line(argv, capsys, expected[0], out)
    for part in expected[1:]:
        assert part in line, line


def test_a_missing_hub_model_in_a_real_process_has_no_traceback(files, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "memtune", *TRAIN, "--model", "nosuch-org/nosuch-model",
                           "--task", f"csv:{files['ok']}", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "offline mode" in lines[0] and "Traceback" not in proc.stderr, lines
    assert not (tmp_path / "o").exists()

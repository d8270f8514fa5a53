"""Bad input through the CLI: one clear line, exit code 2, no traceback, nothing written."""
import subprocess
import sys

import pytest

from memtune.cli import main

TRAIN = ["train", "--max-steps", "1", "--batch-size", "2", "--train-limit", "8", "--test-limit", "4", "--no-progress"]


def run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture
def csv_ok(tmp_path):
    p = tmp_path / "ok.csv"
    p.write_text("text,label\n" + "".join(f"sample text {i},{i % 2}\n" for i in range(20)))
    return p


CASES = {
    "unknown model alias": (["--model", "tiny-nope", "--task", "digits"], "unknown model 'tiny-nope'"),
    "unknown task": (["--model", "tiny-bert", "--task", "imagenet-21k"], "unknown task"),
    "malformed csv": (["--model", "tiny-bert", "--task", "csv:{bad}"], "line"),
    "label column missing": (["--model", "tiny-bert", "--task", "csv:{ok}", "--label-column", "stars"], "stars"),
    "negative rank": (["--model", "tiny-bert", "--task", "csv:{ok}", "--method", "lora", "--r", "-4"], "lora.r"),
    "option of another method": (["--model", "tiny-bert", "--task", "csv:{ok}", "--method", "full", "--r", "4"],
                                 "do not apply to method 'full'"),
    "unknown method": (["--model", "tiny-bert", "--task", "csv:{ok}", "--method", "prefix"], "unknown method"),
    "modality mismatch": (["--model", "tiny-vit", "--task", "csv:{ok}"], "holds text data"),
    "max length beyond positions": (["--model", "tiny-bert", "--task", "csv:{ok}", "--max-length", "4096"],
                                    "exceeds the model's 512 positions"),
    "absurd batch size": (["--model", "tiny-bert", "--task", "csv:{ok}", "--batch-size", "0"], "--batch-size"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_one_clear_line_and_exit_2(case, capsys, tmp_path, csv_ok):
    bad = tmp_path / "bad.csv"
    bad.write_text('text,label\n"unterminated,1\nfine,0\n')
    argv, expected = CASES[case]
    argv = [a.format(ok=csv_ok, bad=bad) for a in argv]
    out = tmp_path / "out"
    code, err = run(TRAIN + argv + ["--out", str(out)], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("memtune: error:"), err
    assert expected in err[0]
    assert not out.exists(), "nothing may be written for bad input"


def test_exit_code_and_stderr_from_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "memtune", *TRAIN, "--model", "nope", "--task", "digits",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("memtune: error: unknown model 'nope'")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_num_processes_below_one_is_refused(n, capsys, tmp_path, csv_ok):
    out = tmp_path / "out"
    code, err = run(TRAIN + ["--model", "tiny-bert", "--task", f"csv:{csv_ok}", "--num-processes", n,
                             "--out", str(out)], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0] == f"memtune: error: --num-processes must be a whole number >= 1 (1: one process, N: N " \
                     f"data-parallel processes), got {n}"
    assert not out.exists()


def test_train_help_lists_every_method_and_what_each_option_flag_does(capsys):
    import dataclasses

    from memtune.methods import METHODS

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())       # argparse re-wraps: compare whitespace-free of wraps
    for name, cls in METHODS.items():
        first = cls.__doc__.strip().splitlines()[0].strip()
        assert f"{name} {' '.join(first.split())}" in text, name
    owners = {}
    for name, cls in METHODS.items():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(name)
    for option, methods in owners.items():
        assert f"--{option.replace('_', '-')} V [applies to: {', '.join(sorted(methods))}]" in text, option
    # Descriptions come from the configs' docstrings.
    assert "Swish temperature β" in text and "adapter width b" in text


def test_measure_memory_and_eval_before_print_their_results(capsys, tmp_path, csv_ok):
    import json

    out = tmp_path / "out"
    assert main(TRAIN + ["--model", "tiny-bert", "--task", f"csv:{csv_ok}", "--measure-memory", "--eval-before",
                         "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    m = json.loads((out / "metrics.json").read_text())
    assert printed[0] == (f"memory: peak {m['peak_bytes'] / 2**30:.3g} GiB, activations "
                          f"{m['activation_peak_bytes'] / 2**30:.3g} GiB (one training step, batch 2 × 128)")
    assert printed[1] == f"before training: accuracy {m['before']['accuracy']:.4f}"
    assert printed[2].startswith(f"lora: accuracy {m['accuracy']:.4f}")

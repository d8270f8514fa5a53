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

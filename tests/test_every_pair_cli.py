"""`memtune train --model <tiny-X> --method <m>` for every tiny family × method (issue 15's matrix): a supported
pair trains one step and writes its metrics, a refused one exits 2 with the one line the contract test checks
(before writing anything). One test per family, so a family's whole row fails together."""
import json

import pytest

import memtune
from memtune.cli import main
from memtune.models import TINY, load_model

from .conftest import write_image_folder
from .contract_helpers import CLS, refusal


@pytest.fixture
def tiny_data(tmp_path):
    """A 12-row text csv and a 12-image folder (two classes of 8×8 PNGs)."""
    csv = tmp_path / "text.csv"
    csv.write_text("text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} film {i},{i % 2}\n" for i in range(12)))
    images = write_image_folder(tmp_path / "images")
    return {"text": f"csv:{csv}", "image": str(images)}


@pytest.mark.parametrize("tiny", TINY)
def test_every_method_trains_or_is_refused_with_exit_2(tiny, tiny_data, tmp_path, capsys):
    task = tiny_data[load_model(tiny).modality]
    for method in memtune.METHODS:
        out = tmp_path / method
        rc = main(["train", "--model", tiny, "--task", task, "--method", method, "--max-steps", "1",
                   "--batch-size", "4", "--max-length", "16", "--test-limit", "4", "--no-progress", "--out", str(out)])
        err = capsys.readouterr().err
        expected = refusal(method, tiny, CLS)
        if expected is None:
            assert rc == 0, (method, err[-400:])
            assert "accuracy" in json.loads((out / "metrics.json").read_text())
        else:
            assert rc == 2, (method, err[-400:])
            assert expected in err and not (out / "metrics.json").exists(), (method, err[-400:])

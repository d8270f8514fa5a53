"""`memtune compare` on a tiny model: JSON records with the promised fields, a table, two PNGs; bad specs
refused before anything runs; label placement that never overlaps."""
import json

import pytest

from memtune.cli import main


def _csv(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\n" + "\n".join(f"{'yes' if i % 2 else 'no'} {i},{i % 2}" for i in range(40)) + "\n")
    return csv


def test_compare_writes_records_table_and_plots(tmp_path, capsys):
    csv = _csv(tmp_path)
    out, js = tmp_path / "cmp", tmp_path / "records.json"
    code = main(["compare", "--model", "tiny-bert", "--task", f"csv:{csv}", "--methods", "full,linear,lora+gc",
                 "--max-steps", "3", "--batch-size", "4", "--max-length", "16", "--out", str(out),
                 "--json", str(js), "--no-progress"])
    assert code == 0
    records = json.loads(js.read_text())["records"]
    assert [r["label"] for r in records] == ["full", "linear", "lora+gc"]
    for r in records:
        for key in ("method", "trainable_params", "peak_bytes", "activation_peak_bytes", "peak_ratio_vs_full",
                    "step_time_s", "accuracy", "settings", "versions", "git_commit", "techniques"):
            assert key in r, key
    assert records[0]["peak_ratio_vs_full"] == 1.0
    assert records[1]["peak_ratio_vs_full"] < 1.0
    assert records[2]["method"] == "lora" and records[2]["techniques"] == ["gc"]
    assert records[2]["settings"]["gradient_checkpointing"] is True
    assert (out / "lora+gc" / "adapter_config.json").exists()
    for name in ("memory_vs_accuracy.png", "memory_vs_time.png"):
        png = out / name
        assert png.exists() and png.stat().st_size > 1000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lora+gc |" in (out / "results.md").read_text()


@pytest.mark.parametrize("methods,expected", [
    ("foo,bar", "unknown method 'foo'"),
    ("lora,nosuch", "unknown method 'nosuch'"),
    ("lora+zip", "unknown technique 'zip' in 'lora+zip'"),
    ("full+nf4", "nf4 cannot be combined with full"),
    ("linear+gc", "gc is not needed for linear"),
    ("lora:r=0", "lora.r must be a positive integer"),
    ("lora+offload", "offload moves saved activations from GPU to CPU memory"),
])
def test_bad_specs_exit_2_before_anything_runs(methods, expected, tmp_path, capsys):
    import torch

    if methods == "lora+offload" and torch.cuda.is_available():
        pytest.skip("offload is allowed where a GPU is")
    out = tmp_path / "cmp"
    code = main(["compare", "--model", "tiny-bert", "--task", f"csv:{_csv(tmp_path)}", "--methods", methods,
                 "--max-steps", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("memtune: error:") and expected in err[0], err
    assert not out.exists()


def test_labels_of_identical_points_do_not_overlap():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from memtune.plots import place_labels

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    pts = [(1.0, 2.0), (1.0, 2.0), (1.0, 2.0), (1.01, 2.0)]
    ax.scatter(*zip(*pts))
    boxes = place_labels(ax, pts, ["lora", "lora+gc", "sherl", "full+gc"])
    for i in range(len(boxes)):
        for j in range(i):
            assert not boxes[i].overlaps(boxes[j]), (i, j)
    plt.close(fig)


def test_pareto_front():
    from memtune.plots import pareto_front

    #        fast+big   slow+small  dominated  fastest+biggest
    pts = [(1.0, 5.0), (3.0, 1.0), (3.5, 6.0), (0.5, 9.0), (2.0, 2.0)]
    assert pareto_front(pts) == [3, 0, 4, 1]

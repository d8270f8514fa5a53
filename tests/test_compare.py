"""`memtune compare` on a tiny model: JSON records with the promised fields, a table, a PNG."""
import json

from memtune.cli import main


def test_compare_writes_records_table_and_plot(tmp_path, capsys):
    csv = tmp_path / "t.csv"
    csv.write_text("text,label\n" + "\n".join(f"{'yes' if i % 2 else 'no'} {i},{i % 2}" for i in range(40)) + "\n")
    out, js = tmp_path / "cmp", tmp_path / "records.json"
    code = main(["compare", "--model", "tiny-bert", "--task", f"csv:{csv}", "--methods", "full,linear,nosuch",
                 "--max-steps", "3", "--batch-size", "4", "--max-length", "16", "--out", str(out),
                 "--json", str(js), "--no-progress"])
    assert code == 0
    records = json.loads(js.read_text())["records"]
    assert [r["label"] for r in records] == ["full", "linear", "nosuch"]
    for r in records[:2]:
        for key in ("method", "trainable_params", "peak_bytes", "activation_peak_bytes", "peak_ratio_vs_full",
                    "step_time_s", "accuracy", "settings", "versions", "git_commit"):
            assert key in r, key
    assert records[0]["peak_ratio_vs_full"] == 1.0
    assert records[1]["peak_ratio_vs_full"] < 1.0
    assert "unknown method 'nosuch'" in records[2]["error"]
    png = out / "memory_vs_accuracy.png"
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| full |" in (out / "results.md").read_text()

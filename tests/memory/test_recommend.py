"""`memtune plan --budget`: every method × technique at its largest batch, the fastest fitting one marked."""
import json

from memtune.cli import main as cli_main
from memtune.memory.plan import PlanSettings
from memtune.memory.recommend import benchmark_accuracy, recommend

MIB = 2 ** 20


def test_recommend_marks_the_fastest_fitting_configuration(tmp_path):
    bench = tmp_path / "minilm-rotten-tomatoes"
    bench.mkdir()
    (bench / "results.json").write_text(json.dumps({"records": [{"label": "lora", "accuracy": 0.737},
                                                                {"label": "full", "accuracy": 0.78}]}))
    # The modelled GPU's 64 MiB of cuBLAS workspace comes on top of tiny-bert's ~2 MiB of weights and state.
    settings = PlanSettings(model="tiny-bert", batch_size=2, max_length=16, budget_bytes=72 * MIB)
    rec = recommend(settings, methods=["full", "lora", "lst"], profile="l4", benchmarks_root=tmp_path)
    rows = {m.label: m for m in rec.result.methods}
    assert {"full", "lora", "lst", "full+gc", "lora+gc"} <= set(rows)
    # Its trunk runs without grad: checkpointing has nothing to recompute, and the row says so.
    assert rows["lst+gc"].status == "unsupported" and "not needed" in rows["lst+gc"].message
    assert not rows["lst+gc"].recommended
    fitting = [m for m in rows.values() if m.status == "ok" and m.max_batch_size]
    assert [m.label for m in rows.values() if m.recommended] == [rec.best.label]
    assert rec.best.time_per_example_s == min(m.time_per_example_s for m in fitting)
    for m in fitting:                             # time per example is the step at the largest batch / batch
        assert m.max_batch_peak_bytes <= settings.budget_bytes
        assert abs(m.time_per_example_s * m.max_batch_size - m.max_batch_step_time_s) < 1e-12
    # Checkpointing fits more examples and costs a recomputed forward per step.
    assert rows["lora+gc"].max_batch_size > rows["lora"].max_batch_size
    assert rows["full"].time_vs_full == 1.0 and rows["full+gc"].time_vs_full > 1.0
    assert rows["lora"].benchmark_accuracy == {"minilm-rotten-tomatoes": 0.737}
    assert rows["lora+gc"].benchmark_accuracy == {"minilm-rotten-tomatoes": 0.737}
    assert rows["lst"].benchmark_accuracy is None
    assert rec.accuracy_sources == ["benchmarks/minilm-rotten-tomatoes/results.json"]
    assert "chunked_ce" not in rec.techniques and not any("chunked_ce" in label for label in rows)


def test_causal_lm_search_adds_the_chunked_loss():
    """A vocabulary-wide loss: each searched combination also with +chunked_ce; at SmolLM2's 49,152 words it
    fits a larger batch than the same row without it."""
    settings = PlanSettings(model="smollm2-135m", batch_size=1, max_length=256, budget_bytes=4 * 2 ** 30, layers=1)
    rec = recommend(settings, methods=["lora"], profile="l4")
    rows = {m.label: m for m in rec.result.methods}
    assert "chunked_ce" in rec.techniques
    assert {"lora+chunked_ce", "lora+gc+chunked_ce"} <= set(rows)
    for label in ("lora", "lora+gc"):
        plain, chunked = rows[label], rows[label + "+chunked_ce"]
        assert plain.status == chunked.status == "ok"
        assert chunked.max_batch_size > plain.max_batch_size


def test_committed_benchmark_accuracies_are_read():
    table, sources = benchmark_accuracy()
    if sources:                                   # present in a source checkout
        assert all(0.0 <= v <= 1.0 for accs in table.values() for v in accs.values())
        assert "full" in table


def test_cli_with_methods_and_budget_marks_one_row(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = cli_main(["plan", "--model", "tiny-bert", "--methods", "full,lora", "--batch-size", "2", "--max-length",
                     "16", "--budget", "72MiB", "--device-profile", "rtx-4090", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "Predicted step time on rtx-4090" in text
    methods = json.loads(out.read_text())["methods"]
    assert sum(bool(m["recommended"]) for m in methods) == 1
    for m in methods:
        assert m["step_time_s"] > 0 and m["time_vs_full"] is not None and "cost" not in m

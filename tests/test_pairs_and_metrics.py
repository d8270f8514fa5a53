"""Sentence pairs, regression targets and the per-task metrics (memtune.metrics), checked against hand-computed
values; the sweep's selection by the task's main metric and the compare table's metric column."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memtune

from memtune.data import TaskError, load_task, make_collate
from memtune.metrics import (classification_metrics, confusion_matrix, main_score, matthews_corrcoef, pearson,
                             regression_metrics, spearman)

# -------------------------------------------------------------------------------------------------- metrics
# Binary case worked by hand: predictions vs labels give TP=3 (positions 0, 3, 5), FP=1 (2), FN=1 (4), TN=1 (1).
PRED = [1, 0, 1, 1, 0, 1]
TRUE = [1, 0, 0, 1, 1, 1]


def test_binary_metrics_match_the_hand_computed_values():
    m = classification_metrics(PRED, TRUE, num_labels=2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))             # class 1: 0.75
    f1_class0 = 2 * 1 / (2 * 1 + 1 + 1)                                 # TP0=1, FP0=1, FN0=1: 0.5
    assert m["macro_f1"] == pytest.approx((0.75 + f1_class0) / 2)
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (3 − 1) / sqrt(4·4·2·2) = 0.25
    assert m["mcc"] == pytest.approx(0.25)


def test_multiclass_mcc_and_macro_f1_by_hand():
    # 3 classes: rows true, columns predicted.
    pred, true = [0, 1, 2, 2, 1, 0], [0, 1, 2, 1, 1, 2]
    matrix = confusion_matrix(pred, true, 3)
    assert matrix.tolist() == [[1, 0, 0], [0, 2, 1], [1, 0, 1]]
    # Gorodkin: c = 4 correct, s = 6; predicted per class p = (2, 2, 2), true per class t = (1, 3, 2).
    # (c·s − p·t) / sqrt((s² − p·p)(s² − t·t)) = (24 − 12) / sqrt((36 − 12)(36 − 14)) = 12 / sqrt(528)
    assert matthews_corrcoef(matrix) == pytest.approx(12 / math.sqrt(528))
    f1 = [2 * 1 / (2 + 1 + 0), 2 * 2 / (4 + 0 + 1), 2 * 1 / (2 + 1 + 1)]
    m = classification_metrics(pred, true, 3)
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert "f1" not in m                                                # binary F1 only for two classes


def test_degenerate_predictions_score_zero_not_nan():
    m = classification_metrics([1, 1, 1, 1], [0, 1, 0, 1], 2)
    assert m["mcc"] == 0.0 and m["accuracy"] == 0.5
    assert m["f1"] == pytest.approx(2 * 2 / (4 + 2 + 0))
    assert pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) == 0.0


def test_metrics_agree_with_scikit_learn_where_installed():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pred, true = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    m = classification_metrics(pred, true, 4)
    assert m["mcc"] == pytest.approx(sk.matthews_corrcoef(true, pred))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(true, pred, average="macro"))
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(true, pred))


def test_pearson_and_spearman_by_hand():
    # x = 1,2,3; y = 1,2,4: deviations (−1,0,1) and (−4/3,−1/3,5/3): r = 3 / sqrt(2 · 42/9) = 9 / sqrt(84)
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(9 / math.sqrt(84))
    assert spearman([1, 2, 3], [1, 2, 4]) == pytest.approx(1.0)
    # ties share their mean rank: x ranks 1, 2.5, 2.5, 4; y ranks 1, 3, 2, 4 -> 4.5 / sqrt(4.5 · 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    r = regression_metrics([0.0, 1.0, 3.0], [0.0, 2.0, 3.0])
    assert r["mse"] == pytest.approx(1 / 3)
    assert set(r) == {"pearson", "spearman", "mse"}


def test_main_score_defaults_to_accuracy():
    assert main_score({"accuracy": 0.5}) == 0.5
    assert main_score({"accuracy": 0.5, "f1": 0.7, "main_metric": "f1", "val_f1": 0.6}, "val_") == 0.6


# ------------------------------------------------------------------------------------------ pairs and regression
def _pairs_csv(tmp_path, n=20, label=lambda i: i % 2):
    p = tmp_path / "pairs.csv"
    p.write_text("first,second,label\n" + "".join(f"a cat {i},the dog {i},{label(i)}\n" for i in range(n)))
    return p


def test_text_column_pair_reads_two_columns(tmp_path):
    task = load_task(f"csv:{_pairs_csv(tmp_path)}", text_column="first,second")
    ex = task.train[0]
    assert set(ex) == {"text", "text_pair", "label"} and ex["text"].startswith("a cat")
    assert ex["text_pair"].startswith("the dog")
    jl = tmp_path / "pairs.jsonl"
    jl.write_text("".join(json.dumps({"q": f"q{i}", "p": f"p{i}", "label": i % 2}) + "\n" for i in range(10)))
    assert load_task(f"jsonl:{jl}", text_column="q,p").test[0]["text_pair"].startswith("p")
    with pytest.raises(TaskError, match=r"column\(s\) \['third'\] not found"):
        load_task(f"csv:{_pairs_csv(tmp_path)}", text_column="first,third")
    with pytest.raises(TaskError, match="one column name, or two"):
        load_task(f"csv:{_pairs_csv(tmp_path)}", text_column="a,b,c")


def test_pair_collation_separates_the_segments_with_token_types():
    from memtune.tokenizer import char_tokenizer

    tok = char_tokenizer()
    collate = make_collate("text", tok, max_length=64)
    batch = collate([{"text": "ab", "text_pair": "cde", "label": 1}, {"text": "x", "text_pair": "y", "label": 0}])
    ids, types, mask = batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]
    for row in range(2):
        real = ids[row][mask[row] == 1]
        assert real[0] == tok.cls_token_id and (real == tok.sep_token_id).sum() == 2    # [CLS] a [SEP] b [SEP]
        first_sep = int((real == tok.sep_token_id).nonzero()[0])
        assert (types[row][: first_sep + 1] == 0).all() and (types[row][first_sep + 1: len(real)] == 1).all()
    with pytest.raises(TaskError, match="mixes sentence pairs and single texts"):
        collate([{"text": "a", "text_pair": "b", "label": 0}, {"text": "c", "label": 1}])


def test_regression_csv_has_float_labels_and_a_one_output_head(tmp_path):
    p = _pairs_csv(tmp_path, n=30, label=lambda i: f"{i / 10:.1f}")
    task = load_task(f"csv:{p}", text_column="first,second", regression=True, train_limit=10, val_fraction=0.25)
    assert task.regression and task.num_labels == 1 and task.label_names == []
    assert task.main_metric == "pearson" and len(task.train) + len(task.validation) == 10
    assert all(isinstance(ex["label"], float) for ex in task.train)
    batch = make_collate("text", _tokenizer(), regression=True)(task.train[:3])
    assert batch["labels"].dtype == torch.float32
    with pytest.raises(TaskError, match="class labels; regression applies"):
        load_task("digits", regression=True)
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\na,1.0\nb,high\n")
    with pytest.raises(TaskError, match=r"line 3: label 'high' is not a number"):
        load_task(f"csv:{bad}", regression=True)


def _tokenizer():
    from memtune.tokenizer import char_tokenizer

    return char_tokenizer()


def test_regression_head_loss_is_fp32_mse_and_classification_is_unchanged():
    import memtune
    from memtune.models import load_model

    torch.manual_seed(0)
    loaded = load_model("tiny-bert")
    collate = make_collate("text", loaded.preprocessor, regression=True)
    batch = collate([{"text": "a b", "text_pair": "c", "label": 0.5}, {"text": "d", "text_pair": "e f", "label": 2.0}])
    reg = memtune.wrap(loaded, "lora", num_labels=1)
    assert reg.objective == "regression"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reg(**batch)
    assert out.logits.shape == (2, 1) and out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(F.mse_loss(out.logits.float().squeeze(-1), batch["labels"]).item())
    cls = memtune.wrap(load_model("tiny-bert"), "lora", num_labels=2)          # a fresh base: LoRA injects in place
    batch["labels"] = torch.tensor([0, 1])
    out = cls(**batch)
    assert cls.objective == "classification"
    assert torch.equal(out.loss, F.cross_entropy(out.logits.float(), batch["labels"]))


def test_csv_regression_trains_and_eval_reproduces(tmp_path, capsys):
    from memtune.cli import main

    p = _pairs_csv(tmp_path, n=40, label=lambda i: f"{(i % 5) / 2:.1f}")
    run = tmp_path / "run"
    assert main(["train", "--model", "tiny-bert", "--task", f"csv:{p}", "--text-column", "first,second",
                 "--objective", "regression", "--method", "lora", "--max-steps", "3", "--batch-size", "8",
                 "--max-length", "32", "--out", str(run), "--no-progress"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["main_metric"] == "pearson" and {"pearson", "spearman", "mse"} <= set(m) and "accuracy" not in m
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-bert", "--adapter", str(run), "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["pearson"] == m["pearson"] and out["mse"] == m["mse"]

    # predict: the regression value of a pair, given as --text/--text-pair or as two columns of a file.
    assert main(["predict", "--model", "tiny-bert", "--adapter", str(run), "--text", "a cat 3",
                 "--text-pair", "the dog 3", "--json"]) == 0
    given = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["predict", "--model", "tiny-bert", "--adapter", str(run), "--file", str(p),
                 "--text-column", "first,second", "--json"]) == 0
    from_file = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert len(from_file) == 40 and from_file[3]["input"] == ["a cat 3", "the dog 3"]
    assert from_file[3]["value"] == pytest.approx(given["value"], abs=1e-6)
    model = memtune.load("tiny-bert", run).eval()
    batch = make_collate("text", _tokenizer(), max_length=32)([{"text": "a cat 3", "text_pair": "the dog 3",
                                                                 "label": 0}])
    batch.pop("labels")
    with torch.no_grad():
        assert given["value"] == pytest.approx(model(**batch).logits.item(), abs=1e-6)
    assert main(["predict", "--model", "tiny-bert", "--adapter", str(run), "--text", "a", "--text", "b",
                 "--text-pair", "c"]) == 2
    assert "1 second texts for 2 --text" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- selection and the table
def test_sweep_selects_by_the_main_metric_and_keeps_accuracy_otherwise():
    from memtune.sweep import aggregate, select_lr

    # Accuracy tasks: unchanged (val_accuracy decides).
    assert select_lr({1e-4: {"val_accuracy": 0.7}, 1e-3: {"val_accuracy": 0.8}}) == 1e-3
    # MCC task: val_mcc decides even where val_accuracy points the other way.
    trials = {1e-4: {"main_metric": "mcc", "val_mcc": 0.4, "val_accuracy": 0.9},
              1e-3: {"main_metric": "mcc", "val_mcc": 0.5, "val_accuracy": 0.6}}
    assert select_lr(trials) == 1e-3
    recs = [{"main_metric": "f1", "task_metrics": ["f1", "accuracy"], "f1": v, "accuracy": a, "val_f1": v}
            for v, a in ((0.6, 0.5), (0.8, 0.7))]
    rec = aggregate(recs, [0, 1])
    assert rec["f1_mean"] == pytest.approx(0.7) and rec["f1_per_seed"] == [0.6, 0.8]
    assert rec["accuracy_mean"] == pytest.approx(0.6) and rec["val_f1_ci95"] is not None


def test_compare_table_shows_the_task_metrics():
    from memtune.compare import markdown_table

    row = dict(label="lora", trainable_params=10, trainable_pct=1.0, peak_bytes=2**30, activation_peak_bytes=2**29,
               step_time_s=0.1, peak_ratio_vs_full=None, activation_ratio_vs_full=None, step_time_ratio_vs_full=None)
    plain = markdown_table([{**row, "accuracy": 0.75}])
    assert "| accuracy |" in plain.splitlines()[0] and plain.splitlines()[2].endswith("| 0.750 |")
    same = markdown_table([{**row, "accuracy": 0.75, "task_metrics": ["accuracy"], "main_metric": "accuracy"}])
    assert same == plain
    table = markdown_table([{**row, "accuracy": 0.75, "f1": 0.8, "main_metric": "f1", "task_metrics": ["f1", "accuracy"]}])
    assert "| F1, accuracy |" in table.splitlines()[0]
    assert table.splitlines()[2].endswith("| F1 0.800; accuracy 0.750 |")
    reg = markdown_table([{**row, "pearson": 0.5, "spearman": 0.4, "main_metric": "pearson",
                           "task_metrics": ["pearson", "spearman"]}])
    assert reg.splitlines()[2].endswith("| Pearson 0.500; Spearman 0.400 |")

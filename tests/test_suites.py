"""glue/<name>, super_glue/<name> and vtab/<name> from tiny local copies in tmp_path (nothing is downloaded):
the layouts and formats accepted, the messages without data, and end-to-end training and evaluation."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from memtune.cli import main
from memtune.data import TaskError, load_task
from memtune.data.suites import DATA_DIR_ENV, GLUE, SUPER_GLUE


# ------------------------------------------------------------------------------------------- tiny copies
def write_mrpc_original(root, n_train=24, n_dev=8):
    """GLUE's own download: glue_data/MRPC/{train,dev}.tsv with a byte-order mark and the original columns."""
    folder = root / "glue_data" / "MRPC"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = ["\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for i in range(n):
            a = f"the cat sat {i}"
            lines.append(f"{i % 2}\t{i}\t{i + 100}\t{a}\t{a if i % 2 else 'dogs run'} \"quoted")
        (folder / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root / "glue_data"


def write_stsb(root, n_train=24, n_val=8):
    folder = root / "glue" / "stsb"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("validation", n_val)):
        rows = [f"a b {i},{'a b' if i % 3 else 'x y'} {i},{(i % 6) * 1.0}" for i in range(n)]
        (folder / f"{split}.csv").write_text("sentence1,sentence2,label\n" + "\n".join(rows) + "\n")
    return root


def write_jsonl(folder, split, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_glue_mrpc_original_layout_is_read_with_its_columns_and_classes(tmp_path):
    data = write_mrpc_original(tmp_path)
    task = load_task("glue/mrpc", data_dir=data)
    assert task.name == "glue/mrpc" and task.kind == "text"
    assert task.label_names == ["not_equivalent", "equivalent"] and task.main_metric == "f1"
    assert len(task.train) == 24 and len(task.test) == 8           # dev is the split memtune tests on
    ex = task.train[1]
    assert ex["text"] == "the cat sat 1" and ex["text_pair"] == 'the cat sat 1 "quoted' and ex["label"] == 1
    assert load_task("GLUE/MRPC", data_dir=tmp_path).test == task.test    # DIR/glue_data/MRPC found from DIR too


def test_every_glue_and_super_glue_task_has_columns_labels_and_a_main_metric():
    assert set(GLUE) >= {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert set(SUPER_GLUE) >= {"boolq", "cb", "rte", "wic"}
    expected = {"cola": "mcc", "sst2": "accuracy", "mrpc": "f1", "qqp": "f1", "stsb": "pearson", "mnli": "accuracy",
                "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy"}
    assert {n: GLUE[n].metrics[0] for n in expected} == expected
    assert GLUE["stsb"].regression and not GLUE["mrpc"].regression
    assert GLUE["mnli"].test[0] == "validation_matched"


def test_hf_column_names_string_labels_and_val_split_names(tmp_path):
    nli = [{"premise": f"p {i}", "hypothesis": f"h {i}", "label": ["entailment", "neutral", "contradiction"][i % 3]}
           for i in range(9)]
    write_jsonl(tmp_path / "glue" / "mnli", "train", nli)
    write_jsonl(tmp_path / "glue" / "mnli", "validation_matched", nli[:3])
    write_jsonl(tmp_path / "glue" / "mnli", "validation_mismatched", nli[:6])
    task = load_task("glue/mnli", data_dir=tmp_path)
    assert [ex["label"] for ex in task.test] == [0, 1, 2] and task.num_labels == 3
    assert len(load_task("glue/mnli_mismatched", data_dir=tmp_path).test) == 6
    # SuperGLUE's own jsonl: val.jsonl, boolean labels; WiC puts the word before the first sentence.
    boolq = [{"question": f"q {i}", "passage": f"p {i}", "label": bool(i % 2), "idx": i} for i in range(6)]
    write_jsonl(tmp_path / "SuperGLUE" / "BoolQ", "train", boolq)
    write_jsonl(tmp_path / "SuperGLUE" / "BoolQ", "val", boolq[:2])
    task = load_task("super_glue/boolq", data_dir=tmp_path)
    assert task.label_names == ["false", "true"] and [ex["label"] for ex in task.test] == [0, 1]
    wic = [{"word": "bank", "sentence1": f"s {i}", "sentence2": f"t {i}", "label": i % 2 == 0} for i in range(4)]
    write_jsonl(tmp_path / "super_glue" / "wic", "train", wic)
    write_jsonl(tmp_path / "super_glue" / "wic", "validation", wic)
    assert load_task("super_glue/wic", data_dir=tmp_path).train[0]["text"] == "bank: s 0"
    cb = [{"premise": "a", "hypothesis": "b", "label": i % 3} for i in range(6)]
    write_jsonl(tmp_path / "super_glue" / "cb", "train", cb)
    write_jsonl(tmp_path / "super_glue" / "cb", "val", cb)
    assert load_task("super_glue/cb", data_dir=tmp_path).main_metric == "macro_f1"


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
    write_stsb(tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    task = load_task("glue/stsb")
    assert task.regression and task.num_labels == 1 and isinstance(task.test[0]["label"], float)
    assert task.metrics == ("pearson", "spearman")


def test_clear_messages_without_the_data(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(TaskError, match=r"does not download.*--data-dir DIR.*DIR/glue/mrpc/train.tsv"):
        load_task("glue/mrpc")
    with pytest.raises(TaskError, match=r"no folder qqp/ in"):
        load_task("glue/qqp", data_dir=tmp_path)
    with pytest.raises(TaskError, match=r"unknown glue task 'glue/nope'.*glue/cola"):
        load_task("glue/nope", data_dir=tmp_path)
    write_jsonl(tmp_path / "glue" / "rte", "train", [{"sentence1": "a", "sentence2": "b", "label": 0}])
    with pytest.raises(TaskError, match=r"has no validation split"):
        load_task("glue/rte", data_dir=tmp_path)
    write_jsonl(tmp_path / "glue" / "rte", "dev", [{"sentence1": "a", "sentence2": "b", "label": 7}])
    with pytest.raises(TaskError, match=r"label 7 is outside 0..1"):
        load_task("glue/rte", data_dir=tmp_path)
    with pytest.raises(TaskError, match=r"does not exist"):
        load_task("vtab/cifar", data_dir=tmp_path / "missing")
    with pytest.raises(TaskError, match=r"no folder dtd/.*train800.txt"):
        load_task("vtab/dtd", data_dir=tmp_path)


def test_parquet_and_arrow_folders_without_pyarrow_name_what_to_install(tmp_path, monkeypatch):
    folder = tmp_path / "glue" / "sst2"
    folder.mkdir(parents=True)
    (folder / "train.parquet").write_bytes(b"PAR1")
    (folder / "validation").mkdir()
    (folder / "validation" / "dataset_info.json").write_text("{}")
    for name in ("pyarrow", "pyarrow.parquet"):            # as if it were not installed: import raises
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(TaskError, match=r"needs pyarrow \(pip install pyarrow\)"):
        load_task("glue/sst2", data_dir=tmp_path)
    (folder / "train.parquet").unlink()
    write_jsonl(folder, "train", [{"sentence": "a", "label": 0}, {"sentence": "b", "label": 1}])
    with pytest.raises(TaskError, match=r"save_to_disk folder; reading it needs pyarrow"):
        load_task("glue/sst2", data_dir=tmp_path)


def _save_to_disk_layout(folder, rows: dict, parts: int = 2):
    """A split folder as datasets' save_to_disk writes it: Arrow IPC stream files named in state.json."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    table = pa.table(rows)
    names = [f"data-{k:05d}-of-{parts:05d}.arrow" for k in range(parts)]
    step = -(-table.num_rows // parts)
    for k, name in enumerate(names):
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(k * step, step))
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_split": folder.name}))
    (folder / "dataset_info.json").write_text("{}")


def test_arrow_folder_read_with_pyarrow_in_file_order(tmp_path):
    pytest.importorskip("pyarrow")
    rows = {"sentence1": ["a", "b", "c"], "sentence2": ["d", "e", "f"], "label": [0, 1, 0]}
    for split in ("train", "validation"):
        _save_to_disk_layout(tmp_path / "glue" / "rte" / split, rows)
    task = load_task("glue/rte", data_dir=tmp_path)
    assert [ex["label"] for ex in task.test] == [0, 1, 0] and task.test[2]["text_pair"] == "f"
    (tmp_path / "glue" / "rte" / "validation" / "data-00001-of-00002.arrow").write_bytes(b"not arrow")
    with pytest.raises(TaskError, match="not a readable `datasets` folder"):
        load_task("glue/rte", data_dir=tmp_path)


def test_cli_without_data_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    assert main(["train", "--model", "tiny-bert", "--task", "glue/cola", "--method", "lora",
                 "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memtune: error: glue/cola: memtune does not download")


# ----------------------------------------------------------------------------------------------- end to end
def _train(tmp_path, task, data, run, *extra, model="tiny-bert"):
    return main(["train", "--model", model, "--task", task, "--data-dir", str(data), "--method", "lora",
                 "--max-steps", "3", "--batch-size", "8", "--max-length", "32", "--out", str(run), "--no-progress",
                 *extra])


def test_glue_mrpc_trains_reports_f1_and_accuracy_and_eval_reproduces(tmp_path, capsys):
    data = write_mrpc_original(tmp_path)
    run = tmp_path / "run"
    assert _train(tmp_path, "glue/mrpc", data, run) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["main_metric"] == "f1" and m["task_metrics"] == ["f1", "accuracy"]
    for key in ("f1", "accuracy", "macro_f1", "mcc"):
        assert 0 <= m[key] <= 1 or key == "mcc"
    assert m["settings"]["data_dir"] == str(data) and m["test_examples"] == 8
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"lora: f1 {m['f1']:.4f}, accuracy")
    assert main(["eval", "--model", "tiny-bert", "--adapter", str(run), "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["f1"] == m["f1"] and out["accuracy"] == m["accuracy"] and out["main_metric"] == "f1"


def test_glue_stsb_trains_as_regression_and_eval_reproduces(tmp_path, capsys):
    write_stsb(tmp_path)
    run = tmp_path / "run"
    assert _train(tmp_path, "glue/stsb", tmp_path, run) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["main_metric"] == "pearson" and "accuracy" not in m
    assert -1 <= m["pearson"] <= 1 and -1 <= m["spearman"] <= 1
    assert json.loads((run / "adapter_config.json").read_text())["objective"] == "regression"
    capsys.readouterr()
    assert main(["eval", "--model", "tiny-bert", "--adapter", str(run), "--no-progress"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["pearson"] == m["pearson"] and out["spearman"] == m["spearman"]
    # A classification adapter cannot score a regression task.
    write_mrpc_original(tmp_path / "m")
    cls = tmp_path / "cls"
    assert _train(tmp_path, "glue/mrpc", tmp_path / "m" / "glue_data", cls) == 0
    assert main(["eval", "--model", "tiny-bert", "--adapter", str(cls), "--task", "glue/stsb", "--data-dir",
                 str(tmp_path), "--no-progress"]) == 2


# ----------------------------------------------------------------------------------------------------- VTAB
def _png(path, value):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)


def write_vtab_lists(root, name="cifar", per_class=(4, 2, 3), classes=3):
    """vtab-1k/<name>/ with images/ and the list files; per_class = (train800, val200, test) images per class."""
    folder = root / "vtab-1k" / name
    lists = {"train800": [], "val200": [], "test": []}
    for split, n in zip(lists, per_class):
        for c in range(classes):
            for i in range(n):
                rel = f"images/{split}/{c}_{i}.png"
                _png(folder / rel, 40 * c + i)
                lists[split].append(f"{rel} {c}")
    for split, lines in lists.items():
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    (folder / "train800val200.txt").write_text("\n".join(lists["train800"] + lists["val200"]) + "\n")
    return root


def test_vtab_list_files_train_on_800_plus_200_and_validate_on_200(tmp_path):
    write_vtab_lists(tmp_path)
    task = load_task("vtab/cifar", data_dir=tmp_path)
    assert task.kind == "image" and task.label_names == ["0", "1", "2"]
    assert len(task.train) == 18 and len(task.test) == 9 and not task.validation
    assert task.train[0]["image"].shape == (8, 8, 3)
    split = load_task("vtab/cifar", data_dir=tmp_path, val_fraction=0.1)        # VTAB's own 800/200 split
    assert len(split.train) == 12 and len(split.validation) == 6
    assert len(load_task("vtab/cifar", data_dir=tmp_path, test_limit=3).test) == 3


def test_vtab_class_folders(tmp_path):
    folder = tmp_path / "vtab" / "dtd"
    for split, n in (("train800", 2), ("val200", 1), ("test", 2)):
        for c in ("banded", "woven"):
            for i in range(n):
                _png(folder / split / c / f"{i}.png", 10 * i)
    task = load_task("vtab/dtd", data_dir=tmp_path)
    assert task.label_names == ["banded", "woven"] and len(task.train) == 6 and len(task.test) == 4
    bad = tmp_path / "vtab" / "kitti"
    bad.mkdir()
    (bad / "test.txt").write_text("x.png 0\n")
    with pytest.raises(TaskError, match=r"image .*x.png not found"):
        load_task("vtab/kitti", data_dir=tmp_path)


def test_vtab_trains_with_tiny_vit(tmp_path, capsys):
    write_vtab_lists(tmp_path)
    run = tmp_path / "run"
    assert _train(tmp_path, "vtab/cifar", tmp_path, run, model="tiny-vit") == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["main_metric"] == "accuracy" and m["train_examples"] == 18 and m["test_examples"] == 9
    assert 0 <= m["accuracy"] <= 1


def test_compare_preflight_reads_the_suite_from_the_data_dir(tmp_path, monkeypatch):
    from memtune.preflight import check_compare

    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    data = write_mrpc_original(tmp_path)
    check_compare(["lora"], {"data_dir": str(data), "max_length": 32}, "tiny-bert", "glue/mrpc")
    with pytest.raises(TaskError, match="does not download"):
        check_compare(["lora"], {"max_length": 32}, "tiny-bert", "glue/mrpc")


@pytest.mark.parametrize("method", ["full", "bitfit", "lst", "sherl", "meft1", "qst"])
def test_stsb_regression_trains_with_side_networks_and_reversible_methods(tmp_path, method):
    from memtune.train import TrainArgs, train

    write_stsb(tmp_path, n_train=16, n_val=8)
    m = train(TrainArgs(model="tiny-bert", task="glue/stsb", data_dir=str(tmp_path), method=method,
                        out=str(tmp_path / "run"), max_steps=2, batch_size=8, max_length=32, progress=False))
    assert m["main_metric"] == "pearson" and np.isfinite(m["train_loss"]) and "spearman" in m


def test_lst_fisher_init_on_a_regression_task_uses_the_squared_error(tmp_path):
    """Fisher importance through the regression head's loss (MSE): the run trains and reports Pearson."""
    write_stsb(tmp_path)
    run = tmp_path / "run"
    assert _train(tmp_path, "glue/stsb", tmp_path, run, "--method", "lst", "--init", "fisher",
                  "--fisher-samples", "4") == 0
    assert json.loads((run / "metrics.json").read_text())["main_metric"] == "pearson"


def test_parquet_split_where_pyarrow_is_installed(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    folder = tmp_path / "glue" / "qnli"
    folder.mkdir(parents=True)
    rows = {"question": ["q0", "q1"], "sentence": ["s0", "s1"], "label": [0, 1], "idx": [0, 1]}
    for split in ("train", "validation"):
        pq.write_table(pa.table(rows), folder / f"{split}.parquet")
    task = load_task("glue/qnli", data_dir=tmp_path)
    assert task.test[1] == {"text": "q1", "text_pair": "s1", "label": 1}


def test_datasets_save_to_disk_folder_where_datasets_is_installed(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"sentence1": ["a", "b", "c"], "sentence2": ["d", "e", "f"], "label": [0, 1, 0]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                               "validation": datasets.Dataset.from_dict(rows)})
    dd.save_to_disk(str(tmp_path / "glue" / "rte"))
    task = load_task("glue/rte", data_dir=tmp_path)
    assert [ex["label"] for ex in task.test] == [0, 1, 0] and task.train[0]["text_pair"] == "d"

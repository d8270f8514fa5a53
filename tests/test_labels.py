"""Class names travel with the adapter: saved as id2label/label2id, returned by `memtune.load`, and checked
(or mapped by name) when `memtune eval` scores the adapter on a task."""
import json

import pytest
import torch

import memtune
from memtune.checkpoint import CheckpointError
from memtune.cli import main
from memtune.data import load_task, make_collate
from memtune.train import TrainArgs, train

WORDS = {"negative": "bad awful poor", "neutral": "plain okay average", "positive": "good great fine"}


def write_task(path, classes, rename=None):
    rename = rename or {}
    rows = [f"{WORDS[c]} movie {i},{rename.get(c, c)}" for i in range(60) for c in [sorted(classes)[i % len(classes)]]]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("labels")
    csv = write_task(d / "three.csv", WORDS)
    out = d / "run"
    train(TrainArgs(model="tiny-bert", task=f"csv:{csv}", method="lora", out=str(out), max_steps=8, batch_size=6,
                    max_length=32, progress=False, seed=0, checkpoint_every=4))
    return out


def test_class_names_are_saved_and_loaded(adapter):
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert cfg["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    model = memtune.load("tiny-bert", adapter)
    assert model.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    assert model.label2id == {"negative": 0, "neutral": 1, "positive": 2}


def eval_cli(adapter, csv, capsys):
    code = main(["eval", "--model", "tiny-bert", "--adapter", str(adapter), "--task", f"csv:{csv}", "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def accuracy_by_name(adapter, csv) -> float:
    """Accuracy with predictions and truths compared as class NAMES (no id mapping involved)."""
    model = memtune.load("tiny-bert", adapter).eval()
    task = load_task(f"csv:{csv}")
    collate = make_collate("text", memtune.load_model("tiny-bert").preprocessor, max_length=32)
    with torch.no_grad():
        logits = model(**collate(task.test)).logits
    predicted = [model.id2label[i] for i in logits.argmax(-1).tolist()]
    truth = [task.label_names[ex["label"]] for ex in task.test]
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth)


def test_eval_on_a_subset_of_the_classes_maps_them_by_name(adapter, tmp_path, capsys):
    csv = write_task(tmp_path / "two.csv", ["negative", "positive"])
    code, out, err = eval_cli(adapter, csv, capsys)
    assert code == 0, err
    assert len(err) == 1 and "a subset of the adapter's" in err[0] and "mapped" in err[0], err
    assert "['negative', 'positive']" in err[0] and "['negative', 'neutral', 'positive']" in err[0]
    # The task's id 1 is "positive" but the adapter's id 1 is "neutral": only a mapping by name scores it right.
    assert json.loads(out.strip().splitlines()[-1])["accuracy"] == pytest.approx(accuracy_by_name(adapter, csv))


def test_eval_on_renamed_classes_is_refused_naming_both_sets(adapter, tmp_path, capsys):
    csv = write_task(tmp_path / "renamed.csv", WORDS, rename={"neutral": "mixed"})
    code, out, err = eval_cli(adapter, csv, capsys)
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("memtune: error:"), err
    assert "['mixed', 'negative', 'positive']" in err[0] and "['negative', 'neutral', 'positive']" in err[0], err[0]
    assert "['mixed'] cannot be mapped" in err[0]


def test_an_adapter_saved_without_class_names_still_loads_and_evaluates(adapter, tmp_path, capsys):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(adapter, old)
    cfg = json.loads((old / "adapter_config.json").read_text())
    del cfg["id2label"], cfg["label2id"]
    (old / "adapter_config.json").write_text(json.dumps(cfg))
    model = memtune.load("tiny-bert", old)
    assert model.id2label is None and model.num_labels == 3
    code, out, err = eval_cli(old, adapter.parent / "three.csv", capsys)
    assert code == 0 and not err, err
    assert 0 <= json.loads(out.strip().splitlines()[-1])["accuracy"] <= 1


def test_resume_on_a_task_with_other_class_names_is_refused(adapter, tmp_path):
    csv = write_task(tmp_path / "renamed.csv", WORDS, rename={"neutral": "mixed"})
    with pytest.raises(CheckpointError, match=r"classes \['negative', 'neutral', 'positive'\] differ from the "
                                              r"model's \['mixed', 'negative', 'positive'\]"):
        train(TrainArgs(model="tiny-bert", task=f"csv:{csv}", method="lora", out=str(tmp_path / "r"), max_steps=9,
                        batch_size=6, max_length=32, progress=False, resume=str(adapter)))

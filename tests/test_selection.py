"""--select-best: the validation split is scored after every epoch and the best epoch's weights are tested and
saved; a resumed run selects what an uninterrupted one does."""
import json

import pytest
import torch
from safetensors.torch import load_file

import memtune.train
from memtune.cli import main
from memtune.selection import BestEpoch
from memtune.train import ArgumentError, TrainArgs, train


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)

    def trainable_named_parameters(self):
        return [("w", self.w)]


def test_the_best_epoch_is_kept_and_restored_over_later_worse_ones():
    model, sel = _Model(), BestEpoch("accuracy")
    with torch.no_grad():
        model.w.fill_(1.0)
    assert sel.offer(model, {"accuracy": 0.7, "macro_f1": 0.1}, epoch=1, step=10)
    with torch.no_grad():
        model.w.fill_(2.0)
    assert not sel.offer(model, {"accuracy": 0.7}, epoch=2, step=20)     # a tie keeps the earlier epoch
    with torch.no_grad():
        model.w.fill_(3.0)
    assert not sel.offer(model, {"accuracy": 0.6}, epoch=3, step=30)
    sel.restore(model)
    assert torch.equal(model.w, torch.full((3,), 1.0))
    summary = sel.summary()
    assert (summary["best_epoch"], summary["best_step"], summary["best_value"]) == (1, 10, 0.7)
    assert [h["value"] for h in summary["history"]] == [0.7, 0.7, 0.6]


def test_a_loss_is_selected_lowest_first():
    model, sel = _Model(), BestEpoch(None)           # a causal LM: no main metric, its eval loss decides
    assert sel.offer(model, {"eval_loss": 2.0, "perplexity": 7.4}, 1, 5)
    with torch.no_grad():
        model.w.fill_(5.0)
    assert sel.offer(model, {"eval_loss": 1.5, "perplexity": 4.5}, 2, 10)
    assert not sel.offer(model, {"eval_loss": 1.7, "perplexity": 5.5}, 3, 15)
    assert sel.summary()["best_epoch"] == 2 and sel.summary()["metric"] == "eval_loss"


def test_a_checkpoint_state_without_its_tensors_is_refused():
    sel = BestEpoch("accuracy")
    with pytest.raises(ValueError, match="no selected tensors"):
        sel.load({"history": [{"epoch": 1, "step": 4, "metric": "accuracy", "value": 0.5}], "best": 0}, None)


def csv_task(tmp_path):
    p = tmp_path / "task.csv"
    rows = [f"{'good great fine' if i % 2 else 'bad awful poor'} movie {i},{i % 2}" for i in range(60)]
    p.write_text("text,label\n" + "\n".join(rows) + "\n")
    return p


def args(tmp_path, out, **kw):
    base = dict(model="tiny-bert", task=f"csv:{csv_task(tmp_path)}", method="lora", out=str(tmp_path / out),
                epochs=4, batch_size=4, max_length=32, progress=False, seed=2, lr=5e-3, val_fraction=0.2,
                select_best=True)
    return TrainArgs(**{**base, **kw})


def test_the_saved_and_tested_weights_are_those_of_the_best_validation_epoch(tmp_path, monkeypatch):
    seen = []                                    # the trainable tensors at every validation evaluation
    offer = BestEpoch.offer

    def recording(self, model, results, epoch, step):
        seen.append({n: p.detach().clone() for n, p in model.trainable_named_parameters()})
        return offer(self, model, results, epoch, step)

    monkeypatch.setattr(BestEpoch, "offer", recording)
    m = train(args(tmp_path, "run"))
    sel = m["selection"]
    assert [h["epoch"] for h in sel["history"]] == [1, 2, 3, 4.0]       # one score per epoch, the last included
    best = [h["step"] for h in sel["history"]].index(sel["best_step"])
    assert sel["best_value"] == max(h["value"] for h in sel["history"])
    assert m["val_accuracy"] == sel["best_value"]           # the reported validation score is the pick's
    saved = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert saved.keys() == seen[best].keys()
    for k in saved:
        assert torch.equal(saved[k], seen[best][k]), k


def test_a_run_stopped_mid_training_resumes_to_the_same_selection(tmp_path, monkeypatch):
    straight = train(args(tmp_path, "straight", checkpoint_every=5))
    save = memtune.train.save_training_checkpoint

    def save_then_stop(out, model, optimizer, scheduler, progress, selected=None):
        path = save(out, model, optimizer, scheduler, progress, selected=selected)
        if progress["step"] == 20:                   # mid epoch 3 of 4 (9 steps per epoch): two epochs scored
            assert selected is not None and len(progress["selection"]["history"]) == 2
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(memtune.train, "save_training_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(args(tmp_path, "stopped", checkpoint_every=5))
    monkeypatch.undo()
    resumed = train(args(tmp_path, "stopped", checkpoint_every=5, resume=str(tmp_path / "stopped")))
    assert resumed["selection"] == straight["selection"]
    a = load_file(str(tmp_path / "stopped" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    for k in b:
        assert torch.equal(a[k], b[k]), k


def test_select_best_without_a_validation_split_is_refused(tmp_path, capsys):
    with pytest.raises(ArgumentError, match="--val-fraction"):
        args(tmp_path, "x", val_fraction=0.0).validate()
    assert main(["train", "--model", "tiny-bert", "--task", f"csv:{csv_task(tmp_path)}", "--select-best",
                 "--no-progress", "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err
    assert "--select-best" in err and "--val-fraction" in err
    assert not (tmp_path / "cli" / "metrics.json").exists()


def test_compare_passes_select_best_to_every_row_and_records_each_seeds_pick(tmp_path):
    assert main(["compare", "--model", "tiny-bert", "--task", f"csv:{csv_task(tmp_path)}", "--methods", "lora,lst",
                 "--seeds", "2", "--epochs", "2", "--batch-size", "8", "--max-length", "32", "--val-fraction", "0.2",
                 "--select-best", "--no-progress", "--out", str(tmp_path / "cmp")]) == 0
    records = {r["label"]: r for r in json.loads((tmp_path / "cmp" / "results.json").read_text())["records"]}
    for method in ("lora", "lst"):
        picks = []
        for seed in (0, 1):
            metrics = json.loads((tmp_path / "cmp" / method / f"seed-{seed}" / "metrics.json").read_text())
            assert metrics["settings"]["select_best"] is True
            assert [h["epoch"] for h in metrics["selection"]["history"]] == [1, 2.0]
            picks.append(metrics["selection"]["best_epoch"])
        assert records[method]["best_epoch_per_seed"] == picks

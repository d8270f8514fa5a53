"""Best-epoch selection on the validation split (`memtune train --select-best`).

The LST, SHERL and QST recipes evaluate the validation split after every epoch and test the weights of the
best one (specs: lst.md "Seeds and selection", qst.md's Trainer `load_best_model_at_end`). `BestEpoch` keeps
the history of validation scores and a CPU copy of the trainable tensors of the best epoch; both travel in
the training checkpoints (the history in trainer_state.json, the tensors beside it: `resume.SELECTED_NAME`), so a
resumed run selects what an uninterrupted one would.
"""
from __future__ import annotations

import torch

# Scores where lower is better; every other metric (accuracy, f1, pearson, rsum, ...) is higher-is-better.
LOWER_IS_BETTER = ("eval_loss", "perplexity", "mse")


def selection_metric(results: dict, main_metric: str | None) -> str:
    """The key of `results` (one validation evaluation) that selection compares: the task's main metric, or
    the evaluation loss where there is none (causal LM)."""
    if main_metric and main_metric in results:
        return main_metric
    if "eval_loss" in results:
        return "eval_loss"
    raise ValueError(f"no score to select on among {sorted(results)} (main metric {main_metric!r})")


class BestEpoch:
    def __init__(self, main_metric: str | None):
        self.main_metric = main_metric
        self.history: list[dict] = []        # [{"epoch", "step", "metric", "value"}], in training order
        self.best: int | None = None         # index into history
        self.tensors: dict[str, torch.Tensor] | None = None

    def offer(self, model, results: dict, epoch: float, step: int) -> bool:
        """Record one validation evaluation of `model` (after `step` steps); keep a copy of its trainable tensors
        if it is the best so far (ties keep the earlier epoch). Returns whether it became the best."""
        metric = selection_metric(results, self.main_metric)
        value = float(results[metric])
        self.history.append({"epoch": epoch, "step": step, "metric": metric, "value": value})
        if self.best is not None:
            best = self.history[self.best]["value"]
            if not (value < best if metric in LOWER_IS_BETTER else value > best):
                return False
        self.best = len(self.history) - 1
        self.tensors = {n: p.detach().to("cpu", copy=True) for n, p in model.trainable_named_parameters()}
        return True

    def restore(self, model) -> None:
        """Copy the best epoch's trainable tensors back into `model`."""
        if self.tensors is None:
            raise RuntimeError("no validation evaluation was recorded: nothing to restore")
        params = dict(model.trainable_named_parameters())
        with torch.no_grad():
            for name, t in self.tensors.items():
                params[name].copy_(t)

    def summary(self) -> dict:
        """metrics.json's `selection`: the history and the pick."""
        pick = self.history[self.best] if self.best is not None else None
        return {"history": self.history, "best_epoch": pick and pick["epoch"], "best_step": pick and pick["step"],
                "metric": pick and pick["metric"], "best_value": pick and pick["value"]}

    # -- checkpoints ------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"history": self.history, "best": self.best}

    def load(self, state: dict | None, tensors: dict[str, torch.Tensor] | None) -> None:
        """Take back `state()` and the best epoch's tensors from a checkpoint (`resume.read_selected`)."""
        if not state:
            return
        self.history, self.best = list(state["history"]), state["best"]
        if self.best is not None and tensors is None:
            raise ValueError("the checkpoint's progress names a selected epoch but holds no selected tensors")
        self.tensors = tensors

"""Scoring a wrapped model on examples: the task metrics (classification, regression) or loss and perplexity
(causal LM). The metrics themselves are in `memtune.metrics`."""
from __future__ import annotations

import math

import torch

from .metrics import classification_metrics, regression_metrics
from .progress import Progress


@torch.no_grad()
def evaluate(model, examples, collate, batch_size: int, device, progress=False) -> dict:
    """Over `examples`: classification → accuracy, macro_f1, mcc (and f1 of class 1 for two classes);
    regression → pearson, spearman, mse; causal LM → eval_loss and perplexity."""
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    loss_sum = tokens = 0.0
    batches = range(0, len(examples), batch_size)
    bar = Progress(len(batches), "eval", enabled=progress, unit="batch", items_per_update=batch_size,
                   item_unit="examples", every_fraction=None, leave=False)
    for start in batches:
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}
        out = model(**batch)
        if model.objective == "causal-lm":
            n = (batch["labels"][:, 1:] != -100).sum().item()
            loss_sum += out.loss.item() * n
            tokens += n
        elif model.objective == "regression":
            predictions.append(out.logits.float().squeeze(-1).cpu())          # B×1 → B
            labels.append(batch["labels"].cpu())
        else:
            predictions.append(out.logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
        bar.update()
    bar.close()
    model.train(was_training)
    if model.objective == "causal-lm":
        loss = loss_sum / max(tokens, 1)
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}
    pred = torch.cat(predictions).numpy() if predictions else []
    true = torch.cat(labels).numpy() if labels else []
    if model.objective == "regression":
        return {**regression_metrics(pred, true), "eval_examples": len(true)}
    return {**classification_metrics(pred, true, model.num_labels), "eval_examples": len(true)}

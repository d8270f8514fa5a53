"""Scoring a wrapped model on examples: accuracy (classification) or loss and perplexity (causal LM)."""
from __future__ import annotations

import math

import torch

from .progress import Progress


@torch.no_grad()
def evaluate(model, examples, collate, batch_size: int, device, progress=False) -> dict:
    """Accuracy (classification) or loss and perplexity (causal LM) over `examples`."""
    was_training = model.training
    model.eval()
    correct = total = 0
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
        else:
            correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
            total += len(batch["labels"])
        bar.update()
    bar.close()
    model.train(was_training)
    if model.objective == "causal-lm":
        loss = loss_sum / max(tokens, 1)
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50))}
    return {"accuracy": correct / max(total, 1), "eval_examples": total}

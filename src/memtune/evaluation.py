"""Scoring a wrapped model on examples: the task metrics (classification, regression, text-to-text) or loss and
perplexity (causal LM). The metrics themselves are in `memtune.metrics`."""
from __future__ import annotations

import math

import torch

from .metrics import classification_metrics, regression_metrics
from .progress import Progress
from .retrieval_metrics import evaluate_retrieval


@torch.no_grad()
def evaluate(model, examples, collate, batch_size: int, device, progress=False) -> dict:
    """Over `examples`: classification → accuracy, macro_f1, mcc (and f1 of class 1 for two classes);
    regression → pearson, spearman, mse; causal LM → eval_loss and perplexity; seq2seq → the classification
    metrics of the generated label words (an output that is no label word is wrong; its share is
    `invalid_generations`) and `accuracy_scored`, constrained scoring's accuracy (the likeliest label word);
    retrieval (two towers) → recall@k both ways and rsum (`memtune.retrieval_metrics`)."""
    if model.objective == "retrieval":            # two towers: recall@k over the split (retrieval_metrics.py)
        return evaluate_retrieval(model, examples, collate, batch_size, device, progress)
    was_training = model.training
    model.eval()
    predictions, labels, scored = [], [], []
    loss_sum = tokens = 0.0
    batches = range(0, len(examples), batch_size)
    bar = Progress(len(batches), "eval", enabled=progress, unit="batch", items_per_update=batch_size,
                   item_unit="examples", every_fraction=None, leave=False)
    for start in batches:
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}
        if model.objective == "seq2seq":
            pred, best = _text_to_text_predictions(model, batch, collate.label_targets)
            predictions.append(pred)
            scored.append(best)
            labels.append(batch["label_ids"].cpu())
            bar.update()
            continue
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
    if model.objective == "seq2seq":
        classes = len(collate.label_targets)
        best = torch.cat(scored).numpy()
        return {**classification_metrics(pred, true, classes),
                "accuracy_scored": classification_metrics(best, true, classes)["accuracy"],
                "invalid_generations": float((pred < 0).mean()), "eval_examples": len(true)}
    return {**classification_metrics(pred, true, model.num_labels), "eval_examples": len(true)}


def _text_to_text_predictions(model, batch, targets):
    """(generated class B, -1 where no label word; constrained-scoring class B) for one batch."""
    from .seq2seq import greedy_generate, match_targets, score_label_words

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_ids", "decoder_input_ids")}
    eos = model.backbone.config.eos_token_id
    generated = greedy_generate(model, inputs, max(len(t) for t in targets), eos)
    return (match_targets(generated.cpu(), targets, eos),
            score_label_words(model, inputs, targets).argmax(-1).cpu())

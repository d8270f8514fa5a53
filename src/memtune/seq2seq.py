"""Text-to-text classification on encoder-decoders (T5, as the LST and SHERL papers train it): each class is a
word sequence the decoder generates through the frozen, tied LM head.

    words = label_words_for(["negative", "positive"], "neg=bad,pos=good")       # or the class names themselves
    targets = label_targets(tokenizer, words, eos_id)    # per class: its token ids + EOS, e.g. [[2024, 1], ...]
    pred = match_targets(greedy_generate(model, inputs, 4, eos_id), targets, eos_id)   # B class ids, -1: none
    best = score_label_words(model, inputs, targets).argmax(-1)              # constrained: the likeliest class

Generation is the paper's evaluation (an output that is no label word counts as wrong); constrained scoring
ranks the label words by their teacher-forced log-likelihood, so it always names a class.
"""
from __future__ import annotations

import torch

from .data.base import TaskError
from .data.collate import IGNORE_INDEX


def label_words_for(label_names: list[str], spec: str | None) -> list[str]:
    """The word(s) each class is generated as, in class order. spec None: the class names themselves;
    "w0,w1,..." one per class in order; or "name=word,..." for some or all classes (the rest keep their name)."""
    if not spec:
        return list(label_names)
    items = [item.strip() for item in spec.split(",")]
    if all("=" in item for item in items):
        words: dict[str, str] = {}
        for item in items:
            name, word = (part.strip() for part in item.split("=", 1))
            if name not in label_names:
                raise TaskError(f"--label-words: {name!r} is not a class of this task; classes: "
                                f"{', '.join(label_names)}")
            words[name] = word
        out = [words.get(name, name) for name in label_names]
    elif any("=" in item for item in items):
        raise TaskError(f"--label-words {spec!r}: give either one word per class in order (a,b) or name=word "
                        "pairs, not a mix")
    else:
        if len(items) != len(label_names):
            raise TaskError(f"--label-words gives {len(items)} words for {len(label_names)} classes "
                            f"({', '.join(label_names)}); give one per class, in this order")
        out = items
    if any(not w for w in out):
        raise TaskError(f"--label-words {spec!r}: a label word is empty")
    if len(set(out)) != len(out):
        raise TaskError(f"--label-words: two classes share a label word ({', '.join(out)}); each class needs its own")
    return out


def label_targets(tokenizer, words: list[str], eos_id: int | None) -> list[list[int]]:
    """Per class: the tokenizer's ids of its word(s) (no special tokens) followed by EOS."""
    if eos_id is None:
        raise TaskError("text-to-text labels need the model's eos_token_id (its config has none)")
    targets = [list(tokenizer(word, add_special_tokens=False)["input_ids"]) + [eos_id] for word in words]
    if len({tuple(t) for t in targets}) != len(targets):
        raise TaskError(f"label words {words} tokenize to the same ids for two classes; choose other words")
    return targets


def model_label_targets(model, tokenizer) -> list[list[int]] | None:
    """The label targets of a seq2seq classifier (`model.label_words`, the backbone's EOS); None otherwise."""
    if model.objective != "seq2seq" or not getattr(model, "label_words", None):
        return None
    return label_targets(tokenizer, model.label_words, model.backbone.config.eos_token_id)


@torch.no_grad()
def score_label_words(model, inputs: dict, targets: list[list[int]]) -> torch.Tensor:
    """B×C: the log-likelihood Σ_t log p(target_c[t] | target_c[<t], x) of each class's label words (with EOS),
    teacher-forced; one decoder pass per class."""
    B = next(iter(inputs.values())).shape[0]
    device = next(iter(inputs.values())).device
    scores = []
    for target in targets:
        t = torch.tensor(target, device=device).expand(B, -1)                    # B×Lc
        logits = model(**inputs, labels=t).logits.float()                         # B×Lc×V
        scores.append(torch.log_softmax(logits, -1).gather(-1, t[..., None]).squeeze(-1).sum(-1))
    return torch.stack(scores, dim=-1)


@torch.no_grad()
def greedy_generate(model, inputs: dict, max_new_tokens: int, eos_id: int) -> torch.Tensor:
    """B×n generated ids (n ≤ max_new_tokens), greedy, through the method's own forward (any method); a row
    that emitted EOS continues with EOS. Every step reruns the model on the ids so far: label words are a few
    tokens, so this costs a few forwards and needs no per-method cache."""
    bb = model.backbone
    B = inputs["input_ids"].shape[0]
    ids = bb.shift_right(inputs["input_ids"].new_full((B, 1), IGNORE_INDEX))  # B×1: the decoder start token
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        nxt = model(**inputs, decoder_input_ids=ids).logits[:, -1].argmax(-1).masked_fill(done, eos_id)  # B
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == eos_id
        if bool(done.all()):
            break
    return ids[:, 1:]


def match_targets(generated: torch.Tensor, targets: list[list[int]], eos_id: int) -> torch.Tensor:
    """B class ids: the class whose label ids (up to and including EOS) the row generated exactly; -1 for a row
    that generated no label word."""
    lookup = {tuple(t): c for c, t in enumerate(targets)}
    out = []
    for row in generated.tolist():
        cut = row[:row.index(eos_id) + 1] if eos_id in row else row
        out.append(lookup.get(tuple(cut), -1))
    return torch.tensor(out, dtype=torch.long)

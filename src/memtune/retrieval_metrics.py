"""Retrieval metrics for image–caption tasks: recall@k in both directions, with class-level hits.

    recall_at_k(sim, image_labels, text_labels)          # sim: N_img×N_txt, rows images, columns captions
    -> {"i2t_r1": ..., "i2t_r5": ..., "i2t_r10": ..., "t2i_r1": ..., "t2i_r5": ..., "t2i_r10": ..., "rsum": ...}

A query's hit at k: one of its k most similar items of the other modality has the query's class. The captions
of memtune's caption tasks are class-level ("a handwritten seven"): many captions fit an image equally, so the
instance-level recall of COCO (only the caption written for that image counts) would score right answers as
misses; with one class per pair it is the same as COCO's definition. Values are fractions in [0, 1] (COCO
tables print percentages); `rsum` is their sum (0..6), the single number VSE∞ selects checkpoints by.

Every test pair gives one image and one caption, as in COCO's 1k/5k protocol; templated captions repeat, and
equal captions have equal embeddings, so they rank side by side: an image whose best caption is of a wrong
class may see k copies of it, and image→text recall@k can stay below the rate of a random ranking.

Ties: items are ranked by similarity, ties broken by the lower index (a stable sort), so a constant similarity
matrix gives the same answer on every run and machine.

`evaluate_retrieval` encodes a split with a two-tower model (`encode_image`, `encode_text`;
methods/sherl/retrieval.py) and scores it; memtune's evaluation routes retrieval models here.
"""
from __future__ import annotations

import torch

KS = (1, 5, 10)
RETRIEVAL_METRICS = ("rsum", *(f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS))


def hits_at_k(sim: torch.Tensor, query_labels: torch.Tensor, item_labels: torch.Tensor, ks=KS,
              chunk: int = 1024) -> dict[int, float]:
    """{k: share of queries (rows of sim, Q×N) with an item of their class among their k most similar}.

    k larger than N counts every item. Rows are ranked `chunk` at a time (Q×N may not fit at once)."""
    if sim.dim() != 2 or sim.shape != (len(query_labels), len(item_labels)):
        raise ValueError(f"similarities of shape {tuple(sim.shape)} for {len(query_labels)} queries and "
                         f"{len(item_labels)} items; expected queries × items")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError("recall@k needs at least one query and one item")
    top = min(max(ks), sim.shape[1])
    first_hit = []
    for start in range(0, sim.shape[0], chunk):
        rows = sim[start:start + chunk].float()
        # Stable descending sort: equal similarities keep index order (the lower index ranks first).
        order = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :top]       # C×top
        same = item_labels[order] == query_labels[start:start + chunk, None]                 # C×top
        # Rank (0-based) of the first same-class item; `top` when there is none in the first `top`.
        rank = torch.where(same.any(1), same.float().argmax(1), torch.full_like(same[:, 0], top, dtype=torch.long))
        first_hit.append(rank)
    rank = torch.cat(first_hit)
    return {k: float((rank < min(k, top)).float().mean()) for k in ks}


def recall_at_k(sim, image_labels, text_labels, ks=KS) -> dict[str, float]:
    """Image→text (rows of sim) and text→image (columns) recall@k, and rsum; sim: N_img×N_txt."""
    sim = torch.as_tensor(sim)
    image_labels, text_labels = torch.as_tensor(image_labels).long(), torch.as_tensor(text_labels).long()
    i2t = hits_at_k(sim, image_labels, text_labels, ks)
    t2i = hits_at_k(sim.t(), text_labels, image_labels, ks)
    out = {f"i2t_r{k}": v for k, v in i2t.items()} | {f"t2i_r{k}": v for k, v in t2i.items()}
    return {"rsum": sum(out.values()), **out}


@torch.no_grad()
def evaluate_retrieval(model, examples, collate, batch_size: int, device, progress=False) -> dict:
    """Encode every image and caption of `examples` (B at a time), then recall@k over the whole split's
    N×N cosine similarities (pair i: image i, caption i, class label i), plus `eval_examples`."""
    from .progress import Progress

    if not examples:
        raise ValueError("retrieval evaluation needs at least one example")
    was_training = model.training
    model.eval()
    images, texts, labels = [], [], []
    batches = range(0, len(examples), batch_size)
    bar = Progress(len(batches), "eval", enabled=progress, unit="batch", items_per_update=batch_size,
                   item_unit="examples", every_fraction=None, leave=False)
    for start in batches:
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size]).items()}
        images.append(model.encode_image(batch["pixel_values"]).float().cpu())             # B×E
        texts.append(model.encode_text(batch["input_ids"], batch.get("attention_mask"),
                                       batch.get("token_type_ids")).float().cpu())          # B×E
        labels.append(batch["labels"].cpu())
        bar.update()
    bar.close()
    model.train(was_training)
    labels = torch.cat(labels)
    sim = torch.cat(images) @ torch.cat(texts).t()                                          # N×N
    return {**recall_at_k(sim, labels, labels), "eval_examples": len(labels)}

"""recall@k with class-level hits (memtune.retrieval_metrics) on hand-made similarity matrices."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from memtune.retrieval_metrics import RETRIEVAL_METRICS, hits_at_k, recall_at_k


def test_hits_at_k_on_a_hand_made_matrix():
    # 3 queries × 6 items; item classes [0, 1, 2, 0, 1, 2].
    items = torch.tensor([0, 1, 2, 0, 1, 2])
    sim = torch.tensor([
        [0.9, 0.1, 0.2, 0.3, 0.0, 0.0],   # query class 0: best item 0 (class 0) → rank 0
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],   # query class 2: order 0,1,2 → first class-2 item at rank 2
        [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],   # query class 1: order 5,4 → first class-1 item (4) at rank 1
    ])
    queries = torch.tensor([0, 2, 1])
    got = hits_at_k(sim, queries, items, ks=(1, 2, 3, 10))
    assert got == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: 1.0, 10: 1.0}


def test_a_query_whose_class_is_missing_never_hits():
    got = hits_at_k(torch.tensor([[0.5, 0.4]]), torch.tensor([3]), torch.tensor([0, 1]), ks=(1, 5))
    assert got == {1: 0.0, 5: 0.0}


def test_ties_rank_the_lower_index_first():
    """A constant matrix: every query sees items in index order, so the answer is fixed."""
    items = torch.tensor([1, 0, 0, 0])
    got = hits_at_k(torch.zeros(2, 4), torch.tensor([0, 1]), items, ks=(1, 2))
    assert got == {1: 0.5, 2: 1.0}        # query class 1: item 0 first (hit); class 0: item 1 second


def test_recall_at_k_reads_rows_as_images_and_columns_as_captions():
    # 2 images × 3 captions. Image 0 (class 0) ranks caption 1 (class 1) first, then caption 0 (class 0).
    # Caption columns: caption 0 (class 0) ranks image 0 first (hit); caption 1 (class 1): image 0 then image 1;
    # caption 2 (class 1): image 1 first (hit).
    sim = torch.tensor([[0.5, 0.9, 0.1],
                        [0.2, 0.3, 0.8]])
    r = recall_at_k(sim, [0, 1], [0, 1, 1], ks=(1, 5, 10))
    assert r["i2t_r1"] == 0.5 and r["i2t_r5"] == 1.0 and r["i2t_r10"] == 1.0   # image 1 hits at 1, image 0 at 2
    assert r["t2i_r1"] == pytest.approx(2 / 3) and r["t2i_r5"] == 1.0
    assert set(r) == set(RETRIEVAL_METRICS) and r["rsum"] == pytest.approx(sum(v for k, v in r.items() if k != "rsum"))


def test_perfect_embeddings_score_one_and_chunks_do_not_change_the_answer():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    onehot = F.one_hot(labels, 3).float()
    r = recall_at_k(onehot @ onehot.t(), labels, labels)
    assert r["rsum"] == 6.0
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(50, 40, generator=g)
    q, i = torch.randint(0, 4, (50,), generator=g), torch.randint(0, 4, (40,), generator=g)
    assert hits_at_k(sim, q, i, chunk=7) == hits_at_k(sim, q, i)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="queries × items"):
        hits_at_k(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="at least one query"):
        hits_at_k(torch.zeros(0, 3), torch.tensor([], dtype=torch.long), torch.tensor([0, 1, 2]))

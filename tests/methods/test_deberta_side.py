"""DeBERTa-v2's side networks (LST, QST): the side distance table and its wiring (backbones/deberta.py).

The first side block owns the stack's 2k×d' relative-position table (and its LayerNorm), started as the
backbone's table pruned along the embedding dimension to the side's first residual dims P; the later side
blocks read the table that block makes. Checked: the values at init, against LST's own pruning records and
an independent top-d' selection; that r=1 side blocks reproduce the backbone blocks exactly (table included);
the pruning chain of the distance projections where share_att_key is false; gradients.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DebertaV2Config, DebertaV2Model

import memtune
from memtune.backbones import UnsupportedModel
from memtune.methods import config_for

from .side_helpers import batch_for

TABLE = ("rel_embeddings.weight", "rel_norm.weight", "rel_norm.bias")


def wrap(method, model="tiny-deberta-v2", seed=0, **opts):
    torch.manual_seed(seed)
    base = memtune.load_model(model) if isinstance(model, str) else model
    return memtune.wrap(base, config_for(method, opts), num_labels=3)


def side_blocks(model):
    """The side blocks in stack order (LST: the encoder stack's kept blocks; QST: all)."""
    if hasattr(model, "stacks"):
        stack = model.stacks["encoder"]
        return [stack.block(i) for i in stack.keep]
    return list(model.side.blocks)


def magnitude_dims(weight: torch.Tensor, k: int) -> torch.Tensor:
    """The k embedding dims of largest Σ_v |W[v, j]|, sorted (LST's magnitude choice of P, computed here)."""
    return torch.topk(weight.detach().abs().double().sum(0), k).indices.sort().values


# -- the table at init -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [(0, 1, 2, 3), (1, 3)])
def test_lst_table_is_the_backbone_table_at_the_embedding_dims_of_the_pruning(keep):
    model = wrap("lst", keep_layers=keep)
    enc = model.backbone.encoder
    first, *rest = side_blocks(model)
    d_side = model.side_configs["encoder"].hidden_size
    records = model.pruning_records
    # The embedding dims P of LST's chain: the columns block 0's query projection takes from the token table.
    P = magnitude_dims(model.backbone.model.embeddings.word_embeddings.weight, d_side)
    if keep[0] == 0:
        _, _, cols = records["stacks.encoder.blocks.0.attention.self.query_proj.weight"]
        assert torch.equal(cols, P)
    assert first.rel_embeddings.weight.shape == (2 * 16, d_side)
    assert torch.equal(first.rel_embeddings.weight, enc.rel_embeddings.weight[:, P])
    assert torch.equal(first.rel_norm.weight, enc.LayerNorm.weight[P])
    assert torch.equal(first.rel_norm.bias, enc.LayerNorm.bias[P])
    assert not torch.equal(first.rel_embeddings.weight, enc.rel_embeddings.weight[:, :d_side])  # P is chosen
    assert all(not b.owns_table for b in rest)
    # Every other side block parameter is LST's recorded slice of a backbone parameter.
    for name, (src, rows, cols) in records.items():
        w = model.get_parameter(src)
        w = w[rows] if rows is not None else w
        assert torch.equal(model.get_parameter(name), w[:, cols] if cols is not None else w), name
    block_params = {n for n, _ in model.named_parameters() if ".blocks." in n}
    prefix = f"stacks.encoder.blocks.{keep[0]}."
    assert block_params - set(records) == {prefix + t for t in TABLE}


def test_qst_table_is_the_pruned_backbone_table():
    model = wrap("qst")
    enc = model.backbone.encoder
    first = model.side.blocks[0]
    d_side = model.side_config.hidden_size
    assert d_side == 64 // 16
    P = magnitude_dims(model.backbone.model.embeddings.word_embeddings.weight, d_side)
    assert torch.equal(first.rel_embeddings.weight, enc.rel_embeddings.weight[:, P])
    assert torch.equal(first.rel_norm.weight, enc.LayerNorm.weight[P])
    assert torch.equal(first.rel_norm.bias, enc.LayerNorm.bias[P])
    assert [b.owns_table for b in model.side.blocks] == [True, False, False, False]


# -- the wiring ----------------------------------------------------------------------------------------------------
def test_side_blocks_at_r1_reproduce_the_backbone_blocks_table_included():
    """r=1 keeps every dim in order, so LST's pruned side blocks (and the table) are the backbone's: each side
    block on the side context must give the backbone block's output."""
    model = wrap("lst", r=1).eval()
    bb = model.backbone
    batch = batch_for(model)
    with torch.no_grad():
        h, ctx = bb.embed(batch)
        sctx = bb.side_context(h, ctx, model.side_configs["encoder"])
        for i, block in enumerate(side_blocks(model)):
            expected = bb.run_block(i, h, ctx)
            got = bb.run_side_block(block, h, sctx)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
            h = expected
        torch.testing.assert_close(sctx["rel_embeddings"], ctx["rel_embeddings"], rtol=0, atol=1e-6)


def test_every_side_block_reads_the_first_blocks_table():
    model = wrap("lst", keep_layers=(0, 2, 3)).train()
    seen = []
    for block in side_blocks(model):
        block.attention.self.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs["rel_embeddings"]), with_kwargs=True)
    made = []
    first = side_blocks(model)[0]
    first.rel_norm.register_forward_hook(lambda m, a, o: made.append(o))
    model(**batch_for(model))
    d_side = model.side_configs["encoder"].hidden_size
    assert len(made) == 1 and len(seen) == 3 and all(t is made[0] for t in seen)
    assert made[0].shape == (32, d_side)


# -- share_att_key false: separate distance projections --------------------------------------------------------------
def unshared_deberta():
    """DeBERTa-v2's layout: separate pos_key/pos_query projections, no buckets (2·max_relative_positions rows),
    no table LayerNorm, absolute positions."""
    torch.manual_seed(0)
    cfg = DebertaV2Config(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                          intermediate_size=128, relative_attention=True, pos_att_type=["p2c", "c2p"],
                          position_buckets=-1, max_relative_positions=12, share_att_key=False,
                          norm_rel_ebd="none", type_vocab_size=0, pad_token_id=0)
    return DebertaV2Model(cfg)


def test_distance_projections_share_rows_with_q_k_v_when_keys_are_not_shared():
    model = wrap("lst", unshared_deberta(), keep_layers=(0, 2))
    records = model.pruning_records
    attn = "stacks.encoder.blocks.{}.attention.self.{}.weight"
    for i in (0, 2):
        _, rows, cols = records[attn.format(i, "query_proj")]
        for other in ("key_proj", "value_proj", "pos_key_proj", "pos_query_proj"):
            _, r2, c2 = records[attn.format(i, other)]
            assert torch.equal(r2, rows) and torch.equal(c2, cols), (i, other)
        assert records[attn.format(i, "pos_key_proj").replace("weight", "bias")][1] is not None
    first = side_blocks(model)[0]
    assert first.rel_norm is None and first.rel_embeddings.weight.shape[0] == 2 * 12
    _, _, P = records[attn.format(0, "query_proj")]
    assert torch.equal(first.rel_embeddings.weight, model.backbone.encoder.rel_embeddings.weight[:, P])
    batch = {"input_ids": torch.randint(5, 100, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long),
             "labels": torch.tensor([0, 2])}                   # 16 > 12: distances beyond the table are clamped
    model(**batch).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in model.trainable_named_parameters())


# -- gradients ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lst", "qst"])
def test_the_table_trains_and_no_gradient_reaches_the_backbone(method):
    model = wrap(method, mix="sigmoid") if method == "qst" else wrap(method)   # sigmoid mix: u reaches o at step 1
    model.train()
    model(**batch_for(model)).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    first = side_blocks(model)[0]
    for name in TABLE:
        p = first.get_parameter(name)
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
    trainable = {n for n, _ in model.trainable_named_parameters()}
    prefix = "stacks.encoder.blocks.0." if method == "lst" else "side.blocks.0."
    assert {prefix + t for t in TABLE} <= trainable


def test_qst_side_checkpointing_recomputes_the_table_to_the_same_gradients():
    """The table is made inside side step 0 and read by the later steps: with side_checkpointing, step 0's
    recomputation in backward must give the same gradients (the table's included) as the plain run."""
    grads = {}
    for ckpt in (False, True):
        model = wrap("qst", mix="sigmoid", side_checkpointing=ckpt).train()     # same seed: same weights
        batch = batch_for(model)
        torch.manual_seed(7)                                                    # same dropout draws
        model(**batch).loss.backward()
        grads[ckpt] = {n: p.grad.clone() for n, p in model.trainable_named_parameters()}
    assert grads[False].keys() == grads[True].keys()
    assert grads[False]["side.blocks.0.rel_embeddings.weight"].abs().sum() > 0
    for n, g in grads[False].items():
        torch.testing.assert_close(grads[True][n], g, rtol=1e-5, atol=1e-7, msg=n)


def layout(**extra):
    torch.manual_seed(0)
    return DebertaV2Model(DebertaV2Config(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, type_vocab_size=0, **extra))


@pytest.mark.parametrize("extra,table", [
    (dict(relative_attention=False), ()),                                        # no distance table at all
    (dict(relative_attention=True, pos_att_type=["p2c", "c2p"], conv_kernel_size=3), TABLE[:1]),  # xlarge conv
    (dict(relative_attention=True, pos_att_type=["c2p"], norm_rel_ebd="layer_norm", embedding_size=32), TABLE),
])
@pytest.mark.parametrize("method", ["lst", "qst"])
def test_other_layouts_build_and_keep_the_backbone_frozen(method, extra, table):
    opts = {"r": 4} if method == "qst" else {"init": "random"} if "embedding_size" in extra else {}
    model = wrap(method, layout(**extra), **opts).train()
    prefix = "stacks.encoder.blocks.0." if method == "lst" else "side.blocks.0."
    assert {n for n, _ in model.named_parameters() if n.startswith(prefix + "rel_")} == {prefix + t for t in table}
    ids = torch.randint(5, 100, (2, 8))
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for _, p in model.trainable_named_parameters())


def test_lst_pruning_refuses_an_embedding_projection_and_names_the_way_out():
    with pytest.raises(UnsupportedModel, match="embedding_size differs .* use init='random'"):
        wrap("lst", layout(relative_attention=True, pos_att_type=["c2p"], embedding_size=32))

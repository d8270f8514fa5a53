"""LST's pruned-weight initialisation through fused projections (docs/methods/lst.md §8): GPT-2's Conv1D c_attn
[q | k | v], Phi-3's qkv_proj [q (H) | k (KV) | v (KV)] and gate_up_proj, GPT-NeoX's per-head [head, (q, k, v),
d_kv]; and the two Phi-3 / GPT-NeoX forms the tiny models do not take (a sliding window, a sequential residual)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPTNeoXForCausalLM

import memtune
from memtune.backbones import FAMILIES, backbone_for
from memtune.backbones.side_network import Fused
from memtune.methods import ConfigError, config_for
from memtune.methods.lst.prune import transposed
from memtune.models import model_from_config

from ..backbones.test_forward_matches_hf import assert_roundoff_close, assert_sublayers_compose, padded_batch


def test_part_rows_of_each_layout():
    assert [r.tolist() for r in Fused("qkv", (1, 1, 1)).part_rows(6)] == [[0, 1], [2, 3], [4, 5]]
    assert [r.tolist() for r in Fused("qkv", (2, 1, 1)).part_rows(8)] == [[0, 1, 2, 3], [4, 5], [6, 7]]
    # Per head: head 0 holds rows 0..5 as (q q k k v v), head 1 rows 6..11.
    assert [r.tolist() for r in Fused("qkv", (1, 1, 1), groups=2).part_rows(12)] == \
        [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    with pytest.raises(ValueError):
        Fused("qkv", (1, 1, 1)).part_rows(7)


FUSED = {   # tiny alias → {fused path in a block: Fused}, for the side block 0 / backbone block 0
    "tiny-gpt2": {"attn.c_attn": Fused("attn.c_attn", (1, 1, 1))},
    "tiny-phi3": {"self_attn.qkv_proj": Fused("self_attn.qkv_proj", (4, 2, 2)),
                  "mlp.gate_up_proj": Fused("mlp.gate_up_proj", (1, 1))},
    "tiny-gpt-neox": {"attention.query_key_value": Fused("attention.query_key_value", (1, 1, 1), groups=4)},
}


def logical(fused: Fused, rows: int) -> dict[int, tuple[int, int]]:
    """Fused row → (part, index within the part)."""
    return {int(r): (p, j) for p, part in enumerate(fused.part_rows(rows)) for j, r in enumerate(part)}


@pytest.mark.parametrize("name", list(FUSED))
def test_fused_parts_are_pruned_with_the_same_kept_rows(name):
    torch.manual_seed(0)
    model = memtune.wrap(memtune.load_model(name), config_for("lst", {"keep_layers": (0, 2, 3)}), num_labels=3)
    records = model.pruning_records
    for side_name, (src_name, rows, cols) in records.items():      # every copy is the recorded slice
        w = model.get_parameter(src_name)
        w = w[rows] if rows is not None else w
        w = w[:, cols] if cols is not None else w
        assert torch.equal(model.get_parameter(side_name), w), side_name
    side_block = model.output_stack.block(0)
    for path, fused in FUSED[name].items():
        side_m = side_block.get_submodule(path)
        _, r, c = records[f"stacks.decoder.blocks.0.{path}.weight"]
        out_rows = c if transposed(side_m) else r                   # Conv1D stores in×out
        n_src = model.backbone.blocks[0].get_submodule(path).weight.shape[1 if transposed(side_m) else 0]
        src_of = logical(fused, n_src)
        kept = []
        for p, part in enumerate(fused.part_rows(len(out_rows))):   # side part p reads backbone part p only
            src = [src_of[int(x)] for x in out_rows[part]]
            assert {q for q, _ in src} == {p}, (path, p)
            kept.append(torch.tensor([j for _, j in src]))
        if name == "tiny-phi3" and path == "self_attn.qkv_proj":
            # Grouped KV: the same within-head dims J in every q head (4) and every k/v head (2).
            hd_src, hd_side = 16, len(kept[0]) // 4
            J = kept[0][:hd_side] % hd_src
            assert all(torch.equal(k % hd_src, J.repeat(len(k) // hd_side)) for k in kept)
            assert torch.equal(kept[1], kept[2])
        else:
            assert all(torch.equal(k, kept[0]) for k in kept), path
        if side_m.bias is not None:                                 # the bias follows the weight's rows
            assert torch.equal(records[f"stacks.decoder.blocks.0.{path}.bias"][1], out_rows)


def test_a_dominant_key_row_of_a_fused_projection_is_selected():
    lm = memtune.load_model("tiny-gpt2")
    with torch.no_grad():
        lm.model.transformer.h[1].attn.c_attn.weight[:, 64 + 13] *= 100    # Conv1D: column = output row; k part
    model = memtune.wrap(lm, config_for("lst", {}), num_labels=2)
    _, _, out_rows = model.pruning_records["stacks.decoder.blocks.1.attn.c_attn.weight"]
    assert 64 + 13 in out_rows.tolist() and 13 in out_rows.tolist() and 128 + 13 in out_rows.tolist()


def test_phi3_sliding_window_matches_the_hf_forward():
    cfg = FAMILIES["phi3"].tiny_configs()["tiny-phi3"]
    cfg.sliding_window = 4                                          # shorter than the 10-token batch
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = model_from_config(cfg).eval()
    bb = backbone_for(model)
    batch = padded_batch(bb)
    with torch.no_grad():
        ref = model(**bb.model_inputs(batch)).logits
        h, _ = bb(batch)
    assert_roundoff_close(bb.lm_logits(h), ref, bb.num_layers + 1, "phi3 sliding window")
    full = copy.deepcopy(cfg)
    full.sliding_window = None
    torch.manual_seed(0)
    unlimited = model_from_config(full).eval()
    with torch.no_grad():
        assert not torch.allclose(unlimited(**bb.model_inputs(batch)).logits, ref)   # the window matters here


def neox(parallel: bool):
    cfg = FAMILIES["gpt_neox"].tiny_configs()["tiny-gpt-neox"]
    cfg.use_parallel_residual = parallel
    cfg.hidden_dropout = 0.1                                        # so the train-mode check draws masks
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(cfg)


def test_gpt_neox_sequential_residual_has_sublayers_and_parallel_refuses_meft():
    bb = backbone_for(neox(parallel=False))
    assert "sublayers" in bb.capabilities
    assert_sublayers_compose(bb, padded_batch(bb), "gpt_neox sequential")
    model = memtune.wrap(neox(parallel=False), config_for("meft", {}), num_labels=2)
    assert model(**{**padded_batch(bb), "labels": torch.tensor([0, 1])}).loss.isfinite()
    parallel = neox(parallel=True)
    assert "sublayers" not in backbone_for(parallel).capabilities
    with pytest.raises(ConfigError, match="does not support the gpt_neox family"):
        memtune.wrap(parallel, config_for("meft", {}), num_labels=2)

"""BART / mBART backbones: what the shared tests (forward vs HF, contract, baselines, LST, SHERL) do not cover —
the decoder input BartModel builds itself, the EOS-position pooling, the tied LM head, cached decoding with
learned positions, LST's side widths, pruning chain and greedy decoding, SHERL's wiring, and the planner facts.

fp32 on CPU; equalities are exact where the same modules run on the same tensors, else within a few roundoffs
(4·(N + 1)·2⁻²⁴·max|h| as in test_forward_matches_hf.py).
"""
from __future__ import annotations

import pytest
import torch
from transformers import BartForConditionalGeneration, MBartForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.mbart.modeling_mbart import shift_tokens_right as mbart_shift

import memtune
from memtune.backbones import backbone_for, family_class
from memtune.memory.known_configs import resolve_config
from memtune.methods import config_for
from memtune.models import load_model
from memtune.tokenizer import SPECIALS

from ..methods.side_helpers import randomize_side
from .test_forward_matches_hf import assert_roundoff_close

TINIES = ["tiny-bart", "tiny-mbart"]
EOS = SPECIALS.index("[SEP]")


def tiny(name):
    model = load_model(name).model.eval()
    return model, backbone_for(model)


def eos_batch(seed=0):
    """B = 3 rows of 9 tokens, real lengths 9, 6, 4, each ending in EOS, then padding (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (3, 9), generator=g)
    lengths = torch.tensor([9, 6, 4])
    mask = (torch.arange(9)[None] < lengths[:, None]).long()
    ids = ids * mask
    ids[torch.arange(3), lengths - 1] = EOS
    return {"input_ids": ids, "attention_mask": mask}


# -- the decoder input and the pooled feature -------------------------------------------------------------------
@pytest.mark.parametrize("name", TINIES)
def test_without_decoder_ids_the_decoder_reads_the_shifted_input_as_the_hf_model(name):
    model, bb = tiny(name)
    batch = eos_batch()
    with torch.no_grad():
        ref = model(**batch).last_hidden_state                  # HF shifts input_ids itself
        h, ctx = bb(batch)
    assert_roundoff_close(h, ref, 2 * bb.num_layers, f"{name}: decoder output")
    if name == "tiny-mbart":                                    # the last real token (EOS) wrapped to the front
        assert torch.equal(bb.decoder_ids(batch)[:, 0], torch.full((3,), EOS))
    # Pooling reads the EOS position, as BartForSequenceClassification does.
    eos_rows = h[batch["input_ids"] == EOS].view(3, -1, h.shape[-1])[:, -1]
    assert torch.equal(bb.pool(h, ctx), eos_rows)


def test_with_decoder_ids_pooling_reads_the_last_decoder_position():
    _, bb = tiny("tiny-bart")
    batch = dict(eos_batch(), decoder_input_ids=torch.randint(5, 60, (3, 4)))
    with torch.no_grad():
        h, ctx = bb(batch)
    assert h.shape == (3, 4, 64) and torch.equal(bb.pool(h, ctx), h[:, -1])


@pytest.mark.parametrize("name", TINIES)
def test_shift_right_of_targets_matches_transformers(name):
    _, bb = tiny(name)
    targets = torch.tensor([[7, 8, 9, EOS], [10, EOS, -100, -100]])
    if name == "tiny-bart":                                     # start token, then the targets one step late
        expected = torch.tensor([[EOS, 7, 8, 9], [EOS, 10, EOS, 0]])
    else:                                                       # mBART: the last real target in front
        expected = mbart_shift(targets, 0)
        assert torch.equal(expected[:, 0], torch.full((2,), EOS))
    assert torch.equal(bb.shift_right(targets), expected)


@pytest.mark.parametrize("name,generation_class", [("tiny-bart", BartForConditionalGeneration),
                                                   ("tiny-mbart", MBartForConditionalGeneration)])
def test_tied_lm_logits_equal_the_conditional_generation_head(name, generation_class):
    model, bb = tiny(name)
    lm = generation_class(model.config).eval()
    missing, unexpected = lm.model.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("embed_tokens" in k for k in missing)    # tied copies of `shared`
    assert lm.get_output_embeddings().weight.data_ptr() == lm.model.shared.weight.data_ptr()
    batch = dict(eos_batch(), decoder_input_ids=torch.randint(5, 60, (3, 5)))
    with torch.no_grad():
        ref = lm(**batch).logits                                # B×5×V, final_logits_bias = 0
        logits = bb.tied_lm_logits(bb(batch)[0])
    assert logits.shape == (3, 5, bb.config.vocab_size)
    assert_roundoff_close(logits, ref, 2 * bb.num_layers + 1, f"{name}: logits")


@pytest.mark.parametrize("name", TINIES)
def test_cached_decoding_continues_the_learned_positions(name):
    """One token at a time with an EncoderDecoderCache gives the teacher-forced decoder states, so new tokens'
    positions continue after the cached ones."""
    _, bb = tiny(name)
    batch = eos_batch()
    targets = torch.randint(5, 60, (3, 5))
    with torch.no_grad():
        h, ctx = bb.embed(batch)
        for i in range(bb.num_layers):
            h = bb.run_block(i, h, ctx)
        memory = bb.finish_encoder(h)
        full = bb.finish(h, dict(ctx, batch=dict(batch, decoder_input_ids=targets)))      # B×5×d
        cache = EncoderDecoderCache(DynamicCache(config=bb.config), DynamicCache(config=bb.config))
        steps = []
        for t in range(5):
            d, dctx = bb.decoder_embed({"decoder_input_ids": targets[:, t:t + 1]}, memory, ctx["token_mask"], cache)
            for i in range(len(bb.decoder_blocks)):
                d = bb.run_decoder_block(i, d, dctx)
            steps.append(bb.finish_decoder(d))
    assert cache.get_seq_length() == 5
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


# -- LST -------------------------------------------------------------------------------------------------------
def lst(name, **opts):
    torch.manual_seed(0)
    return memtune.wrap(load_model(name), config_for("lst", opts), num_labels=3)


@pytest.mark.parametrize("name", TINIES)
def test_lst_side_configs_are_bart_blocks_at_width_d_over_r(name):
    model = lst(name)
    bb = model.backbone
    for stack, own in (("encoder", bb.blocks), ("decoder", bb.decoder_blocks)):
        c = model.side_configs[stack]
        assert (c.d_model, c.encoder_ffn_dim, c.decoder_ffn_dim) == (8, 16, 16)           # 64/8, 128/8
        assert (c.encoder_attention_heads, c.decoder_attention_heads) == (4, 4)           # heads kept
        assert c._attn_implementation == "sdpa" and c.attention_dropout == 0.0
        assert (c.dropout, c.activation_dropout) == (model.backbone.config.dropout,
                                                    model.backbone.config.activation_dropout)
        blocks = list(model.stacks[stack].blocks.values())
        assert len(blocks) == 4 and all(type(b) is type(own[0]) for b in blocks)       # (M)BartEncoder/DecoderLayer
    norm = model.stacks["decoder"].norm
    assert isinstance(norm, torch.nn.Identity) == (name == "tiny-bart")                  # mBART: a final LN
    other = lst(name, dropout=0.3).side_configs["encoder"]         # the residual rate; the FFN-hidden one is kept
    assert (other.dropout, other.activation_dropout) == (0.3, bb.config.activation_dropout)


@pytest.mark.parametrize("name", TINIES)
def test_lst_pruning_copies_recorded_slices_along_the_chain(name):
    model = lst(name, keep_layers=(0, 2, 3))
    records = model.pruning_records
    for side_name, (src, rows, cols) in records.items():
        w = model.get_parameter(src)
        w = w[rows] if rows is not None else w
        assert torch.equal(model.get_parameter(side_name), w[:, cols] if cols is not None else w), side_name
    side_params = [n for n, _ in model.named_parameters()
                   if n.startswith("stacks.") and (".blocks." in n or ".norm." in n)]
    assert side_params and set(side_params) <= set(records)
    enc, dec = "stacks.encoder.blocks.0", "stacks.decoder.blocks.0"
    q_cols = records[f"{enc}.self_attn.q_proj.weight"][2]
    out_rows = records[f"{enc}.self_attn.out_proj.weight"][1]
    norm_rows = records[f"{enc}.self_attn_layer_norm.weight"][1]
    for x in "kv":                                              # q, k, v share rows and columns
        _, r, c = records[f"{enc}.self_attn.{x}_proj.weight"]
        assert torch.equal(r, records[f"{enc}.self_attn.q_proj.weight"][1]) and torch.equal(c, q_cols)
    if name == "tiny-bart":             # post-LN: the norm takes out_proj's rows, which fc1 then reads
        assert torch.equal(norm_rows, out_rows)
        assert torch.equal(records[f"{enc}.fc1.weight"][2], out_rows)
        cross_in = records[f"{dec}.self_attn_layer_norm.weight"][1]
    else:                               # pre-LN: the norm reads the stream that q, k, v read
        assert torch.equal(norm_rows, q_cols)
        assert torch.equal(records[f"{enc}.final_layer_norm.weight"][1], out_rows)
        assert "stacks.decoder.norm.weight" in records                                   # final LN pruned
        cross_in = records[f"{dec}.self_attn.out_proj.weight"][1]
    assert torch.equal(records[f"{dec}.encoder_attn.k_proj.weight"][2], cross_in)      # cross-attention in chain


def randomized_lst(name):
    return randomize_side(lst(name, keep_layers=(1, 2)))


@pytest.mark.parametrize("name", TINIES)
def test_lst_greedy_generate_equals_greedy_of_teacher_forced_logits(name):
    model = randomized_lst(name)
    batch = eos_batch(seed=2)
    out = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6, stop_at_eos=False)
    assert out.shape == (3, 7) and (out[:, 0] == EOS).all()                  # the decoder start token
    with torch.no_grad():
        taps, ctx = model.backbone_taps(dict(batch, decoder_input_ids=out[:, :-1]))
        logits = model.lm_logits(model.side_forward(taps, ctx))            # B×6×V
    assert torch.equal(logits.argmax(-1), out[:, 1:])
    assert len(set(out[:, 1:].flatten().tolist())) > 2                        # not a constant sequence


def test_lst_beam_search_is_batch_order_independent():
    model = randomized_lst("tiny-bart")
    batch = eos_batch(seed=2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    beams = model.generate(ids, mask, max_new_tokens=4, num_beams=3)
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(model.generate(ids[perm], mask[perm], max_new_tokens=4, num_beams=3), beams[perm])


# -- SHERL -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TINIES)
def test_sherl_with_an_open_route_gives_the_backbone_features(name):
    """U's output 0 and γ = 10 (tanh(100) = 1): each MTSA passes its guide through, the side norms are the
    pretrained final norms at init (mBART: LayerNorm ones / zeros; BART: none), so the features are the
    backbone's own."""
    torch.manual_seed(0)
    model = memtune.wrap(load_model(name), config_for("sherl", {}), num_labels=3).eval()
    assert isinstance(model.side_norm, torch.nn.Identity) == (name == "tiny-bart")
    with torch.no_grad():
        for mtsa in (model.mtsa, model.encoder_mtsa):
            last = mtsa.up if isinstance(mtsa.up, torch.nn.Linear) else mtsa.up[1]
            last.weight.zero_()
            last.bias.zero_()
            mtsa.gamma.fill_(10.0)
        batch = eos_batch()
        h, ctx = model.backbone(batch)
        ref = model.backbone.pool(h, ctx)
        assert (model.features(batch) - ref).abs().max() <= 1e-6


# -- planner facts ---------------------------------------------------------------------------------------------
def test_shipped_configs_and_planner_facts():
    for name, hub, d, layers, params in (("bart-base", "facebook/bart-base", 768, 6, 139_420_416),
                                         ("bart-large", "facebook/bart-large", 1024, 12, 406_291_456)):
        config, _ = resolve_config(name)
        assert resolve_config(hub)[0].to_dict() == config.to_dict()
        family = family_class(config)
        assert family.hf_model_class().__name__ == "BartModel"
        assert (config.d_model, family.depth(config), family.max_positions(config)) == (d, layers, 1024)
        assert family.stacks_equally_deep(config)
        with torch.device("meta"):
            n = sum(p.numel() for p in family.hf_model_class()(config).parameters())
        assert n == params
        batch = family.planning_batch(config, 2, 8, target_length=5)
        assert batch["input_ids"].shape == (2, 8) and batch["decoder_input_ids"].shape == (2, 5)
        assert set(family.planning_batch(config, 2, 8)) == {"input_ids", "attention_mask"}
    shallow = family.with_depth(config, 2)
    assert (shallow.encoder_layers, shallow.decoder_layers) == (2, 2)
    mbart = load_model("tiny-mbart").model
    assert type(mbart).__name__ == "MBartModel" and family_class(mbart.config).hf_model_class() is type(mbart)

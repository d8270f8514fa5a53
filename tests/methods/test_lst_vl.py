"""LST-VL (docs/methods/vl.md §2) on tiny-vl-t5 (tiny-vit beside tiny-t5): the checks of §2.1
1-8, and the composition (`backbones/image_text.py`). The checks that do not need a decoder also run on
tiny-vl-bert (tiny-vit beside tiny-bert, classification)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import memtune
from memtune.backbones import UnsupportedModel
from memtune.backbones.image_text import T5ImageTextBackbone, compose
from memtune.memory.saved import count_saved_inside
from memtune.methods import ConfigError, config_for
from memtune.methods.lst import LSTModel
from memtune.methods.lst.visual import VisualSideEmbedding
from memtune.seq2seq import greedy_generate

from .side_helpers import randomize_side

V = 36                 # the default grid 6 → 6×6 visual tokens
IMAGE = 64             # tiny-vit patch 8: an 8×8 patch grid, pooled to 6×6


# (alias, num_labels): T5 text-to-text and classification, BERT classification.
FORMS = [("tiny-vl-t5", None), ("tiny-vl-t5", 3), ("tiny-vl-bert", 3)]
FORM_IDS = ["t5-seq2seq", "t5-classification", "bert"]
ENCODER_FORMS = [FORMS[0], FORMS[2]]
ENCODER_IDS = ["t5", "bert"]


def wrap(num_labels=None, seed=0, alias="tiny-vl-t5", **opts):
    torch.manual_seed(seed)
    return memtune.wrap(memtune.load_model(alias), config_for("lst", opts), num_labels=num_labels)


def side_encoder_output(model, batch):
    """The side encoder's output drop(Norm(s)) at width d', B×(T+V)×d' (before any up-projection)."""
    taps, ctx = model.backbone_taps(batch)
    if model.backbone.is_encoder_decoder:
        return model.side_encode(taps["encoder"], ctx)
    model.up = nn.Identity()
    return model.side_forward(taps, ctx)


def vl_batch(model, b=3, t=7, seed=1, image=IMAGE):
    """Token ids B×T (example 0 right-padded by 3), pixels B×3×S×S in [0, 1], targets B×4 (or class labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t - 3:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask, "pixel_values": torch.rand(b, 3, image, image, generator=g)}
    if model.objective == "seq2seq":
        batch["labels"] = torch.randint(5, 60, (b, 4), generator=g)
    else:
        batch["labels"] = torch.arange(b) % model.num_labels
    return batch


def text_blocks(model):
    bb = model.backbone
    return list(bb.blocks) + (list(bb.decoder_blocks) if bb.is_encoder_decoder else [])


def vision_blocks(model):
    return list(model.backbone.vision.blocks)



# -- the composition --------------------------------------------------------------------------------------------
def test_composition_keeps_the_text_protocol_and_declares_visual_tokens():
    loaded = memtune.load_model("tiny-vl-t5")
    model = memtune.wrap(loaded, "lst")
    bb = model.backbone
    assert isinstance(bb, T5ImageTextBackbone) and "visual_side_tokens" in bb.capabilities
    assert model.objective == "seq2seq" and model.base_name == "tiny-vl-t5"
    assert bb.model is loaded.model.text_model and bb.vision.model is loaded.model.vision_model
    # The text trunk is T5's own: the backbone forward equals the plain T5 backbone's on the same module.
    plain = memtune.backbones.T5Backbone(loaded.model.text_model).eval()
    bb.eval()
    batch = vl_batch(model)
    batch["decoder_input_ids"] = batch.pop("labels")
    assert torch.equal(bb(batch)[0], plain(batch)[0])
    assert memtune.wrap(memtune.load_model("tiny-t5"), "lst").visual is None


def test_compose_refuses_bad_parts_and_options():
    vit, t5, llama = (memtune.load_model(n) for n in ("tiny-vit", "tiny-t5", "tiny-llama"))
    with pytest.raises(ValueError, match="grid must be a positive integer"):
        compose(vit, t5, grid=0)
    with pytest.raises(UnsupportedModel, match="supported text model types: bert, roberta, t5, xlm-roberta"):
        memtune.wrap(compose(vit, llama), "lst")
    with pytest.raises(UnsupportedModel, match="patch grid"):
        memtune.wrap(compose(t5, memtune.load_model("tiny-t5")), "lst")
    model = memtune.wrap(compose(vit.model, t5.model, grid=2), "lst")       # Hugging Face modules work too
    assert model.backbone.visual_tokens({"pixel_values": torch.rand(2, 3, 32, 32)}).shape == (2, 4, 64)
    dinov2 = memtune.wrap(compose(memtune.load_model("tiny-dinov2"), t5), "lst")
    assert dinov2.backbone.visual_tokens({"pixel_values": torch.rand(2, 3, IMAGE, IMAGE)}).shape == (2, V, 64)
    with pytest.raises(ConfigError, match="greedy_generate"):
        model.generate(torch.ones(1, 3, dtype=torch.long))


# -- §5.1: no saved tensors in either frozen encoder ----------------------------------------------------------
@pytest.mark.parametrize("alias,num_labels", FORMS, ids=FORM_IDS)
def test_frozen_encoders_record_no_graph_and_get_no_grad(alias, num_labels):
    model = wrap(num_labels, alias=alias).train()
    ran = []
    hooks = [b.register_forward_hook(lambda m, a, o: ran.append(m)) for b in vision_blocks(model)]
    with count_saved_inside(vision_blocks(model) + text_blocks(model), model) as inside:
        loss = model(**vl_batch(model)).loss
    for h in hooks:
        h.remove()
    loss.backward()
    assert len(ran) == len(vision_blocks(model))                       # the vision encoder did run
    assert inside.count == 0 and inside.bytes == 0
    assert all(p.grad is None for p in model.backbone.parameters())
    for n, p in model.trainable_named_parameters():
        assert p.grad is not None, n
    for n, p in model.visual.named_parameters():
        assert p.grad.abs().sum() > 0, n


# -- §5.2: the trainable set -------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias,num_labels", ENCODER_FORMS, ids=ENCODER_IDS)
def test_trainable_set_is_the_side_network_and_the_visual_embedding(alias, num_labels):
    model = wrap(num_labels, alias=alias)
    names = {n for n, _ in model.trainable_named_parameters()}
    plain = memtune.wrap(memtune.load_model(alias.replace("vl-", "")), "lst", num_labels=num_labels)
    side = {n for n, _ in plain.trainable_named_parameters()}           # LST's side network on the same T5
    visual = {"visual.proj.weight", "visual.proj.bias", "visual.norm.weight", "visual.type_code",
              "visual.position_codes", "visual.image_order"}
    assert names == side | visual
    assert all(not p.requires_grad for p in model.backbone.parameters())
    d_v = d = 64
    assert sum(p.numel() for p in model.visual.parameters()) == (d_v + 5 + V) * d == 6720
    # At CLIP-T5 shapes (f = 2048, d = 768, 36 tokens): (f + 5 + V)·d. The official MLP's (f + 11)·d = 1,581,312
    # has a 7d box branch where this has one type vector, the same 2-row image-order table, and frozen per-index
    # codes where these train (36d): 30d more.
    official = VisualSideEmbedding(2048, 768, 36)
    count = sum(p.numel() for p in official.parameters())
    assert count == VisualSideEmbedding.parameter_count(2048, 768, 36) == 1_604_352 == 1_581_312 + 30 * 768


# -- §5.3: shapes -------------------------------------------------------------------------------------------------
def test_grid_pools_to_36_tokens_by_max_over_windows():
    model = wrap()
    bb = model.backbone.eval()
    px = torch.rand(2, 3, 96, 96)                                       # a 12×12 patch grid: 2×2 windows
    v = bb.visual_tokens({"pixel_values": px})
    assert v.shape == (2, V, 64) and v.grad_fn is None
    h, _ = bb.vision(dict(pixel_values=px))                             # finished tokens: [CLS] + 144 patches
    grid = h[:, 1:].reshape(2, 6, 2, 6, 2, 64)                          # rows = (6, 2), cols = (6, 2)
    expected = grid.amax(dim=(2, 4)).reshape(2, V, 64)                  # row-major over the 6×6 cells
    assert torch.equal(v, expected)


def test_backbone_sees_text_length_and_side_sees_text_plus_visual():
    model = wrap().eval()
    batch = vl_batch(model, t=7)
    lengths = {}

    def record(key):
        def hook(module, args, output):
            lengths.setdefault(key, args[0].shape[1])       # the first call: the input's sequence length
        return hook
    bb = model.backbone
    side_enc = model.stacks["encoder"].blocks
    side_dec = model.stacks["decoder"].blocks
    hooks = [bb.blocks[0].register_forward_hook(record("backbone encoder")),
             bb.decoder_blocks[0].layer[1].EncDecAttention.k.register_forward_hook(record("backbone cross keys")),
             side_enc["0"].register_forward_hook(record("side encoder")),
             side_dec["0"].layer[1].EncDecAttention.k.register_forward_hook(record("side cross keys"))]
    with torch.no_grad():
        taps, ctx = model.backbone_taps({**batch, "decoder_input_ids": bb.shift_right(batch["labels"])})
        assert taps["encoder"]["visual"].shape == (3, V, 64)
        s_enc = model.side_encode(taps["encoder"], ctx)
        model.side_decode(taps["decoder"], s_enc, ctx)
    for h in hooks:
        h.remove()
    d_side = model.side_configs["encoder"].d_model
    assert s_enc.shape == (3, 7 + V, d_side)
    assert lengths == {"backbone encoder": 7, "backbone cross keys": 7, "side encoder": 7 + V, "side cross keys": 7 + V}


# -- §5.4: the backbone is independent of the image ---------------------------------------------------------------
@pytest.mark.parametrize("alias,num_labels", ENCODER_FORMS, ids=ENCODER_IDS)
def test_changing_the_image_leaves_every_backbone_state_bit_identical(alias, num_labels):
    model = randomize_side(wrap(num_labels, alias=alias)).eval()
    batch = vl_batch(model)
    other = {**batch, "pixel_values": torch.rand(batch["pixel_values"].shape, generator=torch.Generator().manual_seed(9))}
    runs = []
    for b in (batch, other):
        states = []
        hooks = [blk.register_forward_hook(lambda m, a, o: states.append(o[0] if isinstance(o, tuple) else o))
                 for blk in text_blocks(model)]
        with torch.no_grad():
            logits = model(**b).logits
        for h in hooks:
            h.remove()
        runs.append((states, logits))
    (first, logits_a), (second, logits_b) = runs
    assert len(first) == len(text_blocks(model)) == len(second)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.allclose(logits_a, logits_b)                       # the side network does see the image


@pytest.mark.parametrize("alias,num_labels", ENCODER_FORMS, ids=ENCODER_IDS)
def test_side_input_at_visual_positions_does_not_depend_on_the_text(alias, num_labels):
    model = wrap(num_labels, alias=alias).eval()
    batch = vl_batch(model)
    other = {**batch, "input_ids": (batch["input_ids"] + 7) * batch["attention_mask"]}
    seen = []
    hook = model.stacks["encoder"].blocks["0"].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(**batch)
        model(**other)
    hook.remove()
    a, b = seen
    T = batch["input_ids"].shape[1]
    assert torch.equal(a[:, T:], b[:, T:]) and not torch.equal(a[:, :T], b[:, :T])


# -- §5.5: zero ladder at the visual positions ---------------------------------------------------------------------
@pytest.mark.parametrize("alias,num_labels", ENCODER_FORMS, ids=ENCODER_IDS)
def test_visual_positions_are_only_scaled_by_the_gates(monkeypatch, alias, num_labels):
    model = wrap(num_labels, alias=alias, keep_layers=(0, 2, 3)).eval()   # layer 1 dropped: its gate is unused
    stack = model.stacks["encoder"]
    with torch.no_grad():
        stack.gates.normal_(0.0, 0.3)
    stack.norm = nn.Identity()                                          # the state before the final norm
    monkeypatch.setattr(model.backbone, "run_side_block", lambda block, s, sctx: s)   # identity side blocks
    batch = vl_batch(model)
    T = batch["input_ids"].shape[1]
    with torch.no_grad():
        taps, _ = model.backbone_taps(batch)
        s0 = stack.start(model.visual(taps["encoder"]["visual"]))                  # W0·e_v, B×V×d'
        out = side_encoder_output(model, batch)[:, T:]
        expected = s0
        for i in stack.keep:
            expected = stack.mu(i) * expected
    assert torch.equal(out, expected) and not torch.equal(out, s0)


def test_unfactorised_visual_embedding_joins_the_side_sequence_at_side_width():
    model = wrap().eval()
    stack = model.stacks["encoder"]
    d_side = model.side_configs["encoder"].d_model
    model.visual = LSTModel._visual_embedding(model.backbone, d_side, factorised=False)   # P_s: d_v → d'
    batch = vl_batch(model)
    T = batch["input_ids"].shape[1]
    seen = []
    hook = stack.blocks["0"].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(**batch)
        e_v = model.visual(model.backbone.visual_tokens(batch))                    # B×V×d'
    hook.remove()
    assert e_v.shape == (3, V, d_side)
    assert torch.equal(seen[0][:, T:], stack.mu(0) * e_v)             # [W0·e ; e_v], then the zero-ladder fuse


# -- §5.6: the visual embedding's gradient runs through W0 only ---------------------------------------------------
@pytest.mark.parametrize("alias,num_labels", ENCODER_FORMS, ids=ENCODER_IDS)
def test_visual_gradient_flows_through_w0_only(alias, num_labels):
    model = wrap(num_labels, alias=alias).train()
    batch = vl_batch(model)
    model(**batch).loss.backward()
    assert model.visual.proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.stacks["encoder"].ladders["embed"].weight.zero_()
    model(**batch).loss.backward()
    for n, p in model.visual.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, n
    assert model.stacks["encoder"].ladders["embed"].weight.grad.abs().sum() > 0


# -- §5.7: the side relative bias ----------------------------------------------------------------------------------
def first_side_bias(model, batch, monkeypatch):
    """(position bias, additive mask) that the first side block of the side encoder receives on `batch`."""
    bb, seen = model.backbone, {}
    run = bb.run_side_block

    def record(block, s, sctx):
        out = run(block, s, sctx)
        if "text_length" in sctx and "bias" not in seen:
            seen["bias"], seen["mask"] = sctx["position_bias"], sctx["mask"]
        return out
    monkeypatch.setattr(bb, "run_side_block", record)
    with torch.no_grad():
        model(**batch)
    return seen["bias"], seen["mask"]


def test_side_bias_is_t5s_on_the_text_block_and_zero_with_visual_tokens(monkeypatch):
    model = wrap().eval()
    batch = vl_batch(model)                                             # example 0 has 3 padded text tokens
    T = batch["input_ids"].shape[1]
    bias, mask = first_side_bias(model, batch, monkeypatch)
    L = T + V
    assert mask.shape == (3, 1, L, L)
    assert (mask[:, :, :, T:] == 0).all() and (mask[1:] == 0).all()     # visual keys and full rows: visible
    assert (mask[0, :, :, T - 3:T] < -1e30).all()                       # padded text keys: masked
    table = model.stacks["encoder"].blocks["0"].layer[0].SelfAttention
    text_bias = table.compute_bias(T, T)                                # 1×H×T×T
    unmasked = bias - mask
    assert torch.equal(unmasked[1:, :, :T, :T], text_bias.expand(2, -1, -1, -1))
    assert (unmasked[:, :, T:, :] == 0).all() and (unmasked[:, :, :, T:] == 0).all()
    assert text_bias.abs().sum() > 0


# -- §5.8: generation -----------------------------------------------------------------------------------------------
def test_greedy_decode_equals_argmax_of_teacher_forced_logits():
    model = randomize_side(wrap()).eval()
    batch = vl_batch(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    # An EOS id that is never produced, so every row decodes all 5 steps.
    gen = greedy_generate(model, inputs, max_new_tokens=5, eos_id=-1)
    assert gen.shape == (3, 5)
    decoder_ids = torch.cat([model.backbone.shift_right(gen[:, :1])[:, :1], gen[:, :-1]], dim=1)
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=decoder_ids).logits
    assert torch.equal(logits.argmax(-1), gen)
    assert len(set(gen.flatten().tolist())) > 2                         # not a constant sequence


def test_bert_side_runs_over_text_plus_visual_and_pools_both():
    model = wrap(3, alias="tiny-vl-bert").eval()
    batch = vl_batch(model, t=7)
    lengths = []
    hook = model.backbone.blocks[0].register_forward_hook(lambda m, a, o: lengths.append(a[0].shape[1]))
    with torch.no_grad():
        taps, ctx = model.backbone_taps(batch)
        out = model.side_forward(taps, ctx)                            # B×(T+V)×d, up-projected
        feats = model.features(batch)
    hook.remove()
    assert lengths == [7, 7] and out.shape == (3, 7 + V, 64)
    real = torch.cat([batch["attention_mask"], torch.ones(3, V, dtype=torch.long)], dim=1).float()[..., None]
    assert torch.allclose(feats, (out * real).sum(1) / real.sum(1), atol=1e-6, rtol=0)


# -- the rest of the method on the composition: Fisher initialisation and checkpoints ----------------------------
def test_fisher_init_and_checkpoint_round_trip(tmp_path):
    model = wrap(init="fisher", fisher_samples=4)
    batch = vl_batch(model)
    assert model.initialize_from_fisher([batch, batch]) == 4
    with torch.no_grad():
        model.visual.type_code.add_(1.0)                               # trained-looking visual weights
    model.save_pretrained(tmp_path)
    loaded = memtune.load("tiny-vl-t5", tmp_path)
    assert torch.equal(loaded.visual.type_code, model.visual.type_code)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**batch).logits, model.eval()(**batch).logits)

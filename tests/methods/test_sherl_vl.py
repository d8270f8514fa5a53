"""SHERL-VL (docs/methods/vl.md §4 "SHERL in mode B", §5.1, §5.2, §5.6, §5.10; methods/sherl/visual.py) on
tiny-vl-bert (classification, 3 labels) and tiny-vl-t5 (text-to-text and classification): the frozen RMS-matched
prefix, the early route over all V+T positions without a graph, P_s at the visual positions of X̃, the trainable
set, the frozen composition reproduced with the route opened, the trunk cache keyed on the pixels, and
`memtune train` end to end."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import memtune
from memtune.backbones.visual_embedding import VisualEmbedding
from memtune.cli import main
from memtune.memory.saved import count_saved_inside
from memtune.methods import config_for
from memtune.methods.common.trunk_cache import TrunkCacheError

V = 36                          # the default 6×6 pooled grid of a composition
# (alias, num_labels): BERT classification, T5 text-to-text and classification.
FORMS = [("tiny-vl-bert", 3), ("tiny-vl-t5", None), ("tiny-vl-t5", 3)]
FORM_IDS = ["bert", "t5-seq2seq", "t5-classification"]


def wrap(alias="tiny-vl-bert", num_labels=3, seed=0, **opts):
    torch.manual_seed(seed)
    return memtune.wrap(memtune.load_model(alias), config_for("sherl", opts), num_labels=num_labels)


def vl_batch(model, b=3, t=6, seed=1, pixels=None):
    """Token ids B×T (example 0 right-padded by 2), pixels B×3×32×32 in [0, 1], class labels or target ids B×3."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t - 2:] = 0
    px = torch.rand(b, 3, 32, 32, generator=g) if pixels is None else pixels
    batch = {"input_ids": ids * mask, "attention_mask": mask, "pixel_values": px}
    batch["labels"] = (torch.randint(5, 60, (b, 3), generator=g) if model.objective == "seq2seq"
                       else torch.arange(b) % model.num_labels)
    return batch


def text_blocks(model):
    bb = model.backbone
    return list(bb.blocks) + (list(bb.decoder_blocks) if bb.is_encoder_decoder else [])


def frozen_modules(model):
    """Every block of the vision encoder and of the text backbone except the late block(s), and P_b."""
    late = {id(b) for b in model.late_blocks}
    return (list(model.backbone.vision.blocks) + [b for b in text_blocks(model) if id(b) not in late]
            + [model.backbone.visual_prefix])


def open_route(model):
    """U's output forced to 0 and γ = 10 in every MTSA; T5: the side norms given the pretrained final norms'
    (perturbed) weights, which they replace."""
    bb = model.backbone
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for mtsa in [model.mtsa] + ([model.encoder_mtsa] if bb.is_encoder_decoder else []):
            last = mtsa.up if isinstance(mtsa.up, nn.Linear) else mtsa.up[1]   # Linear, or Linear → LN → Dropout
            last.weight.zero_()
            last.bias.zero_()
            mtsa.gamma.fill_(10.0)
        if bb.is_encoder_decoder:
            for pretrained, side in ((bb.model.encoder.final_layer_norm, model.encoder_side_norm),
                                     (bb.model.decoder.final_layer_norm, model.side_norm)):
                pretrained.weight.copy_(1 + 0.5 * torch.randn(pretrained.weight.shape, generator=g))
                side.weight.copy_(pretrained.weight)


def mtsa_inputs(model):
    """Record the features each MTSA reads (the encoder MTSA's under "encoder")."""
    seen = {}
    model.mtsa.register_forward_hook(lambda m, a, o: seen.__setitem__("output", list(a[0])))
    if model.backbone.is_encoder_decoder:
        model.encoder_mtsa.register_forward_hook(lambda m, a, o: seen.__setitem__("encoder", list(a[0])))
    return seen


# -- the frozen prefix -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias", ["tiny-vl-bert", "tiny-vl-t5"])
def test_prefix_is_frozen_seeded_and_reproduced_on_load(alias, tmp_path):
    model = wrap(alias, 3, seed=0)
    other = wrap(alias, 3, seed=7)                   # another global seed: the prefix is drawn from its own
    bb = model.backbone
    assert bb.visual_prefix is not None and bb.visual_prefix_trainable is False
    for (n, p), (_, q) in zip(bb.visual_prefix.named_parameters(), other.backbone.visual_prefix.named_parameters()):
        assert not p.requires_grad and not model.trains(f"backbone.visual_prefix.{n}") and torch.equal(p, q), n
    # W_v ~ N(0, 1/d_v); b_v, t_v and the codes 0 (the vision tokens carry their own positions).
    prefix = bb.visual_prefix
    assert all(torch.count_nonzero(t) == 0 for t in (prefix.proj.bias, prefix.type_code, prefix.position_codes))
    assert abs(prefix.proj.weight.std().item() * bb.visual_width ** 0.5 - 1) < 0.05   # 4,096 draws: σ/√(2n) ≈ 1 %
    with pytest.raises(ValueError, match="already has a frozen visual prefix"):
        bb.add_visual_prefix(trainable=True)
    # A checkpoint holds the trainable tensors only, yet the reloaded model is the same function.
    model.eval()
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    torch.manual_seed(123)
    loaded = memtune.load(alias, tmp_path).eval()
    assert not any("visual_prefix" in n for n, _ in loaded.trainable_named_parameters())
    batch = vl_batch(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_t5_prefix_rows_have_the_rms_of_the_embedding_table():
    model = wrap("tiny-vl-t5", None).eval()
    bb = model.backbone
    c = bb.model.encoder.embed_tokens.weight.pow(2).mean().sqrt()
    assert torch.equal(bb.visual_prefix.norm.weight, c.expand(bb.hidden_size))
    with torch.no_grad():
        v = bb.visual_tokens(vl_batch(model))
        pre = bb.visual_prefix.proj(v)                                    # B×V×D before the norm
        rows = bb.visual_prefix(v).pow(2).mean(-1).sqrt()                 # B×V
    # RMSNorm gives each row RMS c·sqrt(ms/(ms + eps)) = c·(1 - eps/(2·ms) + ...); in float32 the mean over
    # D = 64 squares and the rsqrt add a few ulps (2⁻²⁴ ≈ 6e-8 each): bound both by 10 ulps.
    ms = pre.pow(2).mean(-1)
    bound = c * (bb.prefix_eps / (2 * ms) + 10 * 2.0 ** -24)
    assert ((rows - c).abs() <= bound).all()


def test_bert_prefix_rows_are_standardised_like_the_text_rows():
    torch.manual_seed(0)
    loaded = memtune.load_model("tiny-vl-bert")
    ln = loaded.model.text_model.embeddings.LayerNorm
    with torch.no_grad():                            # away from the init's γ = 1, β = 0
        ln.weight.copy_(1 + 0.5 * torch.randn(ln.weight.shape))
        ln.bias.copy_(0.3 * torch.randn(ln.bias.shape))
    model = memtune.wrap(loaded, "sherl", num_labels=3).eval()
    bb = model.backbone
    assert torch.equal(bb.visual_prefix.norm.weight, ln.weight) and torch.equal(bb.visual_prefix.norm.bias, ln.bias)
    with torch.no_grad():
        h, ctx = bb.embed(vl_batch(model))
    real = torch.cat([torch.ones(3, V, dtype=torch.bool), vl_batch(model)["attention_mask"].bool()], 1)
    z = ((h - ln.bias) / ln.weight)[real]                                  # every real row, γ and β undone
    # LayerNorm rows: mean 0, variance v/(v + eps) ≈ 1 (eps = 1e-12); undoing γ, β in float32 costs a few
    # ulps relative to |β/γ| ≤ 10 here, so 1e-4 bounds both.
    assert z.mean(-1).abs().max() < 1e-4 and (z.pow(2).mean(-1) - 1).abs().max() < 1e-4
    assert z.shape[0] == 3 * V + int(real[:, V:].sum())                   # prefix and text rows alike


# -- §5.1: no saved tensors outside φ_N; no gradient in the backbone ---------------------------------------------
@pytest.mark.parametrize("alias,num_labels", FORMS, ids=FORM_IDS)
def test_only_the_late_blocks_save_tensors_and_the_backbone_gets_no_grad(alias, num_labels):
    model = wrap(alias, num_labels).train()
    seen = mtsa_inputs(model)
    # One counter per forward: saved-tensor hooks do not nest (only the innermost pair sees a tensor).
    with count_saved_inside(model.late_blocks, model) as late:
        model(**vl_batch(model))
    with count_saved_inside(frozen_modules(model), model) as early:
        loss = model(**vl_batch(model)).loss
    loss.backward()
    assert early.count == 0 and early.bytes == 0
    assert late.count > 0 and late.bytes > 0
    B, T = 3, 6
    feats = seen.get("encoder", seen["output"])                            # the stack that reads the image
    assert all(f.shape == (B, V + T, model.backbone.hidden_size) for f in feats)
    assert all(f.grad_fn is None and not f.requires_grad for f in seen["output"] + seen.get("encoder", []))
    for n, p in model.backbone.named_parameters():                        # vision, text (φ_N included), P_b
        assert p.grad is None and not p.requires_grad, n
    for n, p in model.trainable_named_parameters():
        assert p.grad is not None, n


# -- §5.6 negative control: a trainable P_b puts the early blocks on the backprop path -----------------------------
@pytest.mark.parametrize("alias,num_labels", FORMS, ids=FORM_IDS)
def test_trainable_prefix_makes_the_saved_tensor_check_fail(alias, num_labels):
    model = wrap(alias, num_labels).eval()
    bb = model.backbone
    batch = vl_batch(model)
    with count_saved_inside(model.late_blocks, model) as sherl_late:
        model(**batch).loss.backward()
    for p in bb.visual_prefix.parameters():
        p.requires_grad_(True)
    # What training P_b takes: the composition's forward with autograd from P_b on, through every block.
    early_text = [b for b in text_blocks(model) if all(b is not x for x in model.late_blocks)]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if model.objective == "seq2seq":
        inputs["decoder_input_ids"] = bb.shift_right(batch["labels"])
    with count_saved_inside(model.late_blocks, model) as late:
        bb(inputs)
    with count_saved_inside(early_text, model) as early:
        h, ctx = bb(inputs)
    h.sum().backward()
    assert early.count > 0 and early.bytes > 0                            # the check of §5.1 would fail
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.visual_prefix.norm.parameters())
    # φ_N under SHERL keeps what the same block keeps on the full backprop path (vl.md §5.1: ±1 %).
    assert abs(sherl_late.bytes - late.bytes) <= 0.01 * late.bytes
    # SHERL's own early route runs without autograd: even with P_b's flags on, nothing is recorded there.
    for p in bb.visual_prefix.parameters():
        p.grad = None
    with count_saved_inside(early_text + [bb.visual_prefix], model) as guarded:
        model(**batch).loss.backward()
    assert guarded.count == 0 and all(p.grad is None for p in bb.visual_prefix.parameters())


# -- §5.2: the trainable set ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias,num_labels", FORMS, ids=FORM_IDS)
def test_trainable_set_is_the_mtsa_the_side_projection_and_the_head(alias, num_labels):
    model = wrap(alias, num_labels)
    bb = model.backbone
    prefixes = ["mtsa.", "side_visual."]
    if bb.is_encoder_decoder:                    # SHERL's own T5 parts: the encoder MTSA and the two side norms
        prefixes += ["encoder_mtsa.", "encoder_side_norm.", "side_norm."]
    if num_labels:
        prefixes.append("head.")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in model.named_parameters() if n.startswith(tuple(prefixes))}
    assert names == {n for n, _ in model.trainable_named_parameters()}
    assert all(any(n.startswith(p) for n in names) for p in prefixes)
    side = sum(p.numel() for n, p in model.named_parameters() if n.startswith("side_visual."))
    assert side == VisualEmbedding.parameter_count(bb.visual_width, bb.hidden_size, V, bb.prefix_norm)


# -- §5.10: with the route opened, SHERL-VL is the frozen composition ----------------------------------------------
@pytest.mark.parametrize("alias,num_labels", FORMS, ids=FORM_IDS)
def test_open_route_reproduces_the_frozen_composition(alias, num_labels):
    model = wrap(alias, num_labels).eval()
    open_route(model)
    bb = model.backbone
    batch = vl_batch(model)
    if model.objective == "seq2seq":
        batch["decoder_input_ids"] = bb.shift_right(batch["labels"])
    seen = mtsa_inputs(model)
    feats = model.features(batch)                                          # with autograd on
    with torch.no_grad():
        assert torch.count_nonzero(model.side_visual(bb.visual_tokens(batch))) == 0   # P_s starts at exactly 0
        h, ctx = bb(batch)                   # the frozen composition, same frozen prefix, every block in turn
        ref = h if model.per_token else bb.pool(h, ctx)
        ref_out = bb.tied_lm_logits(ref) if model.per_token else model.head(ref)
        out = model(**batch).logits
    # X̃ = 0 + tanh(100)·F_{N-1} and 1 - tanh(100) ≈ 2e-87 is below float32's resolution (tanh(x) rounds to 1
    # for x > 9.01), and P_s adds exact zeros: the late route reads F_{N-1} bit for bit, so the outputs agree
    # to rounding at most; 1e-6 (vl.md §5.10) leaves room for a kernel that reorders a sum.
    assert (feats.detach() - ref).abs().max() <= 1e-6
    assert (out - ref_out).abs().max() <= 1e-6
    assert all(f.grad_fn is None for f in seen["output"] + seen.get("encoder", []))    # F_0..F_{N-1}: no graph
    assert feats.grad_fn is not None                                       # ... and the late route has one


# -- the image reaches the output, and P_s's gradient path (§5.6) ---------------------------------------------------
@pytest.mark.parametrize("alias,num_labels", FORMS, ids=FORM_IDS)
def test_the_image_matters_and_p_s_trains_through_its_output_weight(alias, num_labels):
    model = wrap(alias, num_labels).eval()
    g = torch.Generator().manual_seed(5)
    one, other = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)

    def output(pixels):
        with torch.no_grad():
            return model(**vl_batch(model, pixels=pixels)).logits

    assert not torch.equal(output(one), output(other))                     # through P_b in the early route
    # P_s starts at 0 with its gain at 0: W_v gets exactly no gradient, its gain and codes do.
    ps = model.side_visual
    model(**vl_batch(model, pixels=one)).loss.backward()
    assert torch.count_nonzero(ps.proj.weight.grad) == 0 and torch.count_nonzero(ps.proj.bias.grad) == 0
    assert ps.norm.weight.grad.abs().sum() > 0 and ps.position_codes.grad.abs().sum() > 0
    # With the gain moved, W_v trains, and P_s alone changes the output (the image's second path).
    before = output(one)
    with torch.no_grad():
        ps.norm.weight.normal_(0, 1, generator=g)
    model.zero_grad()
    model(**vl_batch(model, pixels=one)).loss.backward()
    assert ps.proj.weight.grad.abs().sum() > 0
    assert not torch.equal(before, output(one))
    # P_s reads the image: with the early route's image fixed (the prefix's contribution the same for both
    # pixel batches), only P_s can tell them apart.
    with torch.no_grad():
        model.backbone.visual_prefix.proj.weight.zero_()                  # P_b(v) = Norm(0) + 0: no image in F_0
    base = [output(px) for px in (one, other)]
    assert not torch.equal(*base)
    with torch.no_grad():
        ps.norm.weight.zero_()
    assert torch.equal(output(one), output(other))


# -- the trunk cache keys on the pixels ---------------------------------------------------------------------------
def test_trunk_cache_replays_by_text_and_pixels():
    model = wrap(cache_trunk=True, trunk_dropout=False).train()
    fresh = wrap(trunk_dropout=False).train()                              # the same weights, no cache
    fresh.load_state_dict(model.state_dict())
    seen, ref_seen = mtsa_inputs(model), mtsa_inputs(fresh)
    batch = {**vl_batch(model), "example_id": torch.tensor([4, 5, 6])}

    def features(m, rec, b):
        m(**b)
        return rec["output"]

    first = features(model, seen, batch)
    assert len(model.trunk_cache) == 3 and model.trunk_cache.hits == 0
    replay = features(model, seen, batch)
    assert model.trunk_cache.hits == 1 and all(torch.equal(a, b) for a, b in zip(first, replay))
    # The same examples re-batched with two more padded text positions still hit the cache: V + T_e real rows.
    longer = {**batch, "input_ids": nn.functional.pad(batch["input_ids"], (0, 2)),
              "attention_mask": nn.functional.pad(batch["attention_mask"], (0, 2))}
    padded = features(model, seen, longer)
    assert model.trunk_cache.hits == 2
    mask = torch.cat([torch.ones(3, V, dtype=torch.bool), batch["attention_mask"].bool()], 1)
    assert all(torch.equal(a[mask], b[:, :V + 6][mask]) for a, b in zip(first, padded))
    # Other pixels under the same ids: recomputed (one warning), equal to the uncached model's features.
    moved = {**batch, "pixel_values": batch["pixel_values"].flip(-1)}
    with pytest.warns(UserWarning, match="differs from the one cached"):
        changed = features(model, seen, moved)
    assert model.trunk_cache.hits == 2 and model.trunk_cache.mismatches == 3
    ref = features(fresh, ref_seen, moved)           # uncached: padded rows are not zeroed there
    assert all(torch.equal(a[mask], b[mask]) for a, b in zip(changed, ref))
    assert not torch.equal(changed[-1], first[-1])
    strict = wrap(cache_trunk=True, trunk_dropout=False, cache_verify="strict").train()
    strict(**batch)
    with pytest.raises(TrunkCacheError, match="cache_verify=strict"):
        strict(**moved)


# -- the CLI, end to end -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alias,extra,keys", [
    ("tiny-vl-bert", [], ("accuracy", "macro_f1")),
    ("tiny-vl-t5", ["--objective", "seq2seq"], ("accuracy", "accuracy_scored", "invalid_generations")),
], ids=["bert", "t5-seq2seq"])
def test_cli_trains_and_evaluates_sherl_on_a_vqa_task(alias, extra, keys, capsys, tmp_path):
    out = tmp_path / "sherl"
    assert main(["train", "--model", alias, "--method", "sherl", "--task", "digits-vqa/B1", "--train-limit", "16",
                 "--test-limit", "8", "--max-steps", "2", "--batch-size", "8", "--no-progress", "--out", str(out),
                 *extra]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "digits-vqa/B1" and metrics["steps"] == 2 and metrics["test_examples"] == 8
    capsys.readouterr()
    assert main(["eval", "--model", alias, "--adapter", str(out), "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in keys:                                  # the reloaded model, its frozen prefix rebuilt, scores the same
        assert evaluated[key] == metrics[key], key
    model = memtune.load(alias, out)
    names = {n for n, _ in model.trainable_named_parameters()}
    assert any(n.startswith("side_visual.") for n in names) and not any("visual_prefix" in n for n in names)

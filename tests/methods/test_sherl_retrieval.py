"""SHERL's retrieval form (docs/methods/vl.md §3.1 VSE∞ row, §3.2, §5.1, §5.2, §5.10) on tiny-vl-bert (tiny-vit
beside tiny-bert): two towers, each with its own MTSA and late layer, fused only by cosine similarity."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import memtune
from memtune.memory.saved import count_saved_inside
from memtune.methods import ConfigError, config_for
from memtune.methods.sherl import SHERLConfig, SHERLModel, SHERLRetrievalModel
from memtune.train import TrainArgs, train

ALIAS = "tiny-vl-bert"
IMAGE = 32                 # tiny-vit: image 32, patch 8 → a 4×4 patch grid + [CLS]
TRAINABLE_PREFIXES = ("text_tower.mtsa.", "image_tower.mtsa.", "text_fc.", "image_fc.")


def wrap(seed=0, **options):
    torch.manual_seed(seed)
    return memtune.wrap(memtune.load_model(ALIAS), config_for("sherl", {"form": "retrieval", **options}))


def pair_batch(B=4, T=9, seed=1, labels=True):
    """Captions B×T (the last row right-padded by 3), pixels B×3×32×32 in [0, 1], labels 0..B-1 (all distinct)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (B, T), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, T - 3:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask,
             "pixel_values": torch.rand(B, 3, IMAGE, IMAGE, generator=g)}
    if labels:
        batch["labels"] = torch.arange(B)
    return batch


def text_batch(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


# -- the config and the entry point ------------------------------------------------------------------
def test_form_field_selects_the_model_and_checks_its_options():
    assert SHERLConfig().form == "fused" and SHERLConfig.model_class is SHERLModel
    assert SHERLConfig(form="retrieval").model_class is SHERLRetrievalModel
    assert SHERLConfig(form="fused").model_class is SHERLModel
    c = config_for("sherl", {"form": "retrieval", "embed_size": "32", "loss": "infonce", "learn_temperature": "true"})
    assert (c.embed_size, c.loss, c.learn_temperature) == (32, "infonce", True)
    with pytest.raises(ConfigError, match=r"sherl.form must be one of fused, retrieval, got 'two'"):
        config_for("sherl", {"form": "two"})
    with pytest.raises(ConfigError, match=r"sherl: embed_size, loss apply to form=retrieval only"):
        config_for("sherl", {"embed_size": 32, "loss": "infonce"})
    for bad, what in (({"embed_size": 0}, "embed_size"), ({"loss": "triplet"}, "loss"), ({"margin": -1}, "margin"),
                      ({"infonce_temperature": 0}, "infonce_temperature")):
        with pytest.raises(ConfigError, match=f"sherl.{what}"):
            config_for("sherl", {"form": "retrieval", **bad})


def test_refusals_name_what_is_allowed():
    with pytest.raises(ConfigError, match="needs an image-text composition"):
        memtune.wrap(memtune.load_model("tiny-bert"), SHERLConfig(form="retrieval"))
    with pytest.raises(ConfigError, match="no class head .* without num_labels, got 3"):
        memtune.wrap(memtune.load_model(ALIAS), SHERLConfig(form="retrieval"), num_labels=3)
    with pytest.raises(ConfigError, match="text tower must be a BERT-like encoder .* not t5"):
        memtune.wrap(memtune.load_model("tiny-vl-t5"), SHERLConfig(form="retrieval"))
    with pytest.raises(ConfigError, match="does not support cache_trunk"):
        memtune.wrap(memtune.load_model(ALIAS), SHERLConfig(form="retrieval", cache_trunk=True, trunk_dropout=False))
    with pytest.raises(ConfigError, match=r"late_layers=4 leaves no early layer in the 4-layer text tower"):
        wrap(late_layers=4)


def test_towers_follow_the_recipe_of_their_backbone():
    """Text: VSE∞'s text fork (d = D/2, Linear → LN P_l, Linear → LN U); image: CLIP-ViL's (gated P_l)."""
    from memtune.methods.sherl.mtsa import GatedProjection

    model = wrap()
    text, image = model.text_tower, model.image_tower
    assert (text.side_width, image.side_width) == (32, 32)                     # D = 64 in both tiny towers
    assert not isinstance(text.mtsa.proj[0], GatedProjection) and isinstance(text.mtsa.up, nn.Sequential)
    assert isinstance(image.mtsa.proj[0], GatedProjection) and isinstance(image.mtsa.up, nn.Linear)
    assert text.mtsa.num_features == image.mtsa.num_features == 4              # F_0 + blocks 0..2 (N = 4, L = 1)
    assert model.text_fc.in_features == 64 and model.image_fc.in_features == 128   # ViT pools [CLS ‖ mean]
    assert model.text_fc.out_features == model.image_fc.out_features == 1024       # VSE∞'s joint width
    assert model.visual_path and not model.visual_prefix and model.backbone.visual_prefix is None


def test_outputs_are_unit_embeddings_and_their_cosine_matrix():
    model = wrap(embed_size=16).eval()
    batch = pair_batch()
    with torch.no_grad():
        out = model(**batch)
        img, txt = model.encode_image(batch["pixel_values"]), model.encode_text(**text_batch(batch))
    assert img.shape == txt.shape == (4, 16)
    eps = torch.finfo(torch.float32).eps
    assert (img.norm(dim=-1) - 1).abs().max() <= 16 * eps and (txt.norm(dim=-1) - 1).abs().max() <= 16 * eps
    assert torch.equal(out.image_embeds, img) and torch.equal(out.text_embeds, txt)
    assert out.logits.shape == (4, 4) and torch.equal(out.logits, img @ txt.t())


# -- §5.1: no saved tensors in the early blocks of either tower; gradient stops at the backbone ---------------
def test_early_blocks_of_both_towers_save_nothing_and_backbone_gets_no_grad():
    model = wrap(embed_size=16)
    bb, vision = model.backbone, model.backbone.vision
    batch = pair_batch()
    early_text, early_image = list(bb.blocks[:3]), list(vision.blocks[:3])
    # One counter per forward pass: saved-tensor hooks do not nest (the innermost one alone sees the packs).
    counts = []
    for blocks in (early_text + early_image, [bb.blocks[3]], [vision.blocks[3]]):
        with count_saved_inside(blocks, model) as counter:
            loss = model(**batch).loss
        counts.append(counter)
    early, late_text, late_image = counts
    loss.backward()
    assert early.count == 0 and early.bytes == 0
    assert late_text.count > 0 and late_image.count > 0                       # φ_N of each tower records
    assert model.early_blocks == early_text + early_image
    assert model.late_blocks == [bb.blocks[3], vision.blocks[3]]
    for n, p in model.backbone.named_parameters():                            # both towers, φ_N included
        assert not p.requires_grad and p.grad is None, n
    for n, p in model.trainable_named_parameters():
        assert p.grad is not None, n
    assert model.text_tower.mtsa.gamma.grad.abs() > 0 and model.image_tower.mtsa.gamma.grad.abs() > 0


@pytest.mark.parametrize("tower", ["text", "image"])
def test_late_block_saves_what_one_block_on_the_backprop_path_saves(tower):
    """φ_N inside the model saves as many bytes as the same block run alone on an input that needs grad."""
    model = wrap(embed_size=16).eval()
    bb = model.backbone if tower == "text" else model.backbone.vision
    block = bb.blocks[3]
    batch = pair_batch()
    inputs = text_batch(batch) if tower == "text" else {"pixel_values": batch["pixel_values"]}
    with count_saved_inside([block], model) as inside:
        model(**batch).loss.backward()
    with torch.no_grad():
        h, ctx = bb.embed(inputs)
        h, _ = bb.forward_intermediates(h, ctx, stop=3)
    x = h.clone().requires_grad_(True)
    with count_saved_inside([block], model) as alone:
        bb.run_block(3, x, ctx).sum().backward()
    assert alone.bytes > 0 and abs(inside.bytes - alone.bytes) <= 0.01 * alone.bytes


# -- §5.2: the trainable set ------------------------------------------------------------------------
@pytest.mark.parametrize("options,temperature", [({}, False), ({"loss": "infonce"}, False),
                                                 ({"loss": "infonce", "learn_temperature": True}, True)])
def test_trainable_set_is_the_two_mtsas_and_the_two_projections(options, temperature):
    model = wrap(embed_size=16, **options)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(TRAINABLE_PREFIXES)}
    assert expected and names == expected | ({"log_temperature"} if temperature else set())
    assert {n for n, _ in model.trainable_named_parameters()} == names
    assert all(n.startswith("backbone.") for n, p in model.named_parameters() if not p.requires_grad)
    trained, total = model.num_parameters_split()
    mtsa = sum(p.numel() for p in model.text_tower.mtsa.parameters()) + \
        sum(p.numel() for p in model.image_tower.mtsa.parameters())
    fc = (64 + 1) * 16 + (128 + 1) * 16
    assert trained == mtsa + fc + (1 if temperature else 0)


# -- §5.10: with U = 0 and γ = 10 each tower's pooled output is the frozen backbone's --------------------------
def _open_routes(model):
    with torch.no_grad():
        for tower in (model.text_tower, model.image_tower):
            last = tower.mtsa.up if isinstance(tower.mtsa.up, nn.Linear) else tower.mtsa.up[1]   # Linear or LN
            last.weight.zero_()
            last.bias.zero_()
            tower.mtsa.gamma.fill_(10.0)


def _perturb(norm, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=g))


def test_open_route_gives_each_towers_frozen_pooled_output():
    model = wrap(embed_size=16).eval()
    _perturb(model.backbone.vision.model.layernorm)        # a skipped or foreign final norm would show up
    _open_routes(model)
    batch = pair_batch()
    # X̃ = U(ReLU(g)) + tanh(γ/τ)·F_{N-1} with U's output exactly 0, so X̃ differs from F_{N-1} by
    # (1 - tanh(10/0.1))·F_{N-1}; in float32 tanh(100) rounds to 1 (1 - tanh(100) ≈ 2e-87 is far below half an
    # ulp of 1, 2^-25), so the deviation is exactly 0 and X̃ = F_{N-1} bit for bit. The late block, final norm
    # and pooling then repeat the reference's float32 operations on equal inputs: the bound below is the gate's
    # deviation times the largest |F| plus a few float32 ulps of the output for reduction order.
    gate = torch.tanh(torch.tensor(10.0) / model.method_config.temperature)
    deviation = (1 - gate).item()
    assert deviation == 0.0
    eps = torch.finfo(torch.float32).eps
    bb, vision = model.backbone, model.backbone.vision
    with torch.no_grad():
        for tower_bb, got, inputs in ((bb, model.text_features(text_batch(batch)), text_batch(batch)),
                                      (vision, model.image_features(batch["pixel_values"]),
                                       {"pixel_values": batch["pixel_values"]})):
            h, ctx = tower_bb(inputs)                                            # the frozen backbone's forward
            ref = tower_bb.pool(h, ctx)
            f_max = h.abs().max().item()
            tol = deviation * f_max + 4 * eps * ref.abs().max().item()
            assert got.shape == ref.shape and (got - ref).abs().max().item() <= tol


def test_gate_starts_closed_and_the_start_point_is_not_kept():
    model = wrap(embed_size=16).eval()
    batch = pair_batch()
    with torch.no_grad():
        for tower in (model.text_tower, model.image_tower):
            assert tower.mtsa.gamma.item() == 0.0
        h, ctx = model.backbone(text_batch(batch))
        assert (model.text_features(text_batch(batch)) - model.backbone.pool(h, ctx)).abs().max() > 1e-2


# -- the loss ---------------------------------------------------------------------------------------
def _loss_of(sim, labels=None, **options):
    return wrap(embed_size=4, **options).contrastive_loss(torch.tensor(sim), labels)


def test_hinge_loss_on_a_hand_made_similarity_matrix():
    sim = [[0.9, 0.5, 0.1],
           [0.8, 0.6, 0.3],
           [0.2, 0.7, 0.4]]
    # Rows (image i vs captions j ≠ i), [0.2 + S_ij − S_ii]₊: row 0: 0, 0; row 1: 0.4, 0; row 2: 0, 0.5.
    # Columns (caption j vs images i ≠ j), [0.2 + S_ij − S_jj]₊: col 0: 0.1, 0; col 1: 0.1, 0.3; col 2: 0, 0.1.
    hardest = (0 + 0.4 + 0.5 + 0.1 + 0.3 + 0.1) / 3
    total = (0.4 + 0.5 + 0.1 + 0.1 + 0.3 + 0.1) / 3
    tol = 8 * torch.finfo(torch.float32).eps
    assert abs(_loss_of(sim).item() - hardest) <= tol
    assert abs(_loss_of(sim, hardest_negative=False).item() - total) <= tol
    # Images 1 and 2 of one class: pairs (1, 2) and (2, 1) are no negatives.
    same = torch.tensor([0, 1, 1])
    # Rows: 0, 0.4 (caption 0 only), 0 (caption 0 only); columns: 0.1 (image 1), 0.1 (image 0 only), 0 (image 0 only).
    hardest_same = (0 + 0.4 + 0 + 0.1 + 0.1 + 0) / 3
    assert abs(_loss_of(sim, same).item() - hardest_same) <= tol
    assert _loss_of([[0.5]]).item() == 0.0                   # one pair: no negatives


def test_infonce_loss_is_the_symmetric_cross_entropy():
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.6, 0.3], [0.2, 0.7, 0.4]])
    target = torch.arange(3)
    tau = 0.07
    expected = 0.5 * (F.cross_entropy(sim / tau, target) + F.cross_entropy(sim.t() / tau, target))
    got = _loss_of(sim.tolist(), loss="infonce")
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item()
    # Same-class pairs leave the softmax: with 1 and 2 one class, their rows and columns see only pair 0.
    masked = sim.clone()
    masked[1, 2] = masked[2, 1] = float("-inf")
    expected = 0.5 * (F.cross_entropy(masked / tau, target) + F.cross_entropy(masked.t() / tau, target))
    got = _loss_of(sim.tolist(), torch.tensor([0, 1, 1]), loss="infonce")
    assert abs(got.item() - expected.item()) <= 1e-5 * expected.item()
    model = wrap(embed_size=4, loss="infonce", infonce_temperature=0.001)
    assert model.infonce_temperature.item() == pytest.approx(0.01)          # clamped as CLIP's logit scale


def separable_batch(B=6):
    """pair_batch with images of B brightness levels (uniform noise alone gives near-equal tiny-ViT features)."""
    batch = pair_batch(B=B)
    g = torch.Generator().manual_seed(2)
    levels = torch.linspace(0, 1, B).view(B, 1, 1, 1)
    batch["pixel_values"] = 0.5 * levels + 0.5 * torch.rand(B, 3, IMAGE, IMAGE, generator=g)
    return batch


def _fit(model, batch, steps, lr=3e-3, hardest_after=None):
    """AdamW steps in eval mode (no dropout: a deterministic curve); the losses. hardest_after=k: VSE∞'s schedule,
    the sum over all negatives for k steps, then the hardest negative."""
    model.eval()
    opt = torch.optim.AdamW([p for _, p in model.trainable_named_parameters()], lr=lr)
    losses = []
    for step in range(steps):
        if hardest_after is not None:
            model.method_config.hardest_negative = step >= hardest_after
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("options", [{"hardest_negative": False}, {"loss": "infonce"},
                                     {"loss": "infonce", "learn_temperature": True}],
                         ids=["hinge-all-negatives", "infonce", "infonce-learned-temperature"])
def test_loss_decreases_on_a_fixed_batch(options):
    losses = _fit(wrap(embed_size=32, **options), separable_batch(), 20)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_hardest_negative_after_the_vse_warm_up_goes_below_the_collapsed_value():
    """From near-equal embeddings the hardest-negative hinge sits at its collapsed value 2·margin (every
    S_ij = S_ii); VSE∞ therefore sums over all negatives first. After that warm-up it stays below 2·margin."""
    model = wrap(embed_size=32)
    batch = separable_batch()
    with torch.no_grad():
        start = model.eval()(**batch).loss.item()
    assert start >= 2 * model.method_config.margin - 0.1        # near-equal embeddings at init
    losses = _fit(model, batch, 40, hardest_after=20)
    assert max(losses[-5:]) < 2 * model.method_config.margin < start, losses


# -- checkpoints ------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [{}, {"loss": "infonce", "learn_temperature": True, "embed_size": 8}])
def test_save_and_load_roundtrip_gives_equal_embeddings(tmp_path, options):
    model = wrap(**options).eval()
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    loaded = memtune.load(ALIAS, tmp_path).eval()
    assert isinstance(loaded, SHERLRetrievalModel) and loaded.method_config == model.method_config
    batch = pair_batch()
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(batch["pixel_values"]), model.encode_image(batch["pixel_values"]))
        assert torch.equal(loaded.encode_text(**text_batch(batch)), model.encode_text(**text_batch(batch)))
        assert torch.equal(loaded.log_temperature, model.log_temperature)


# -- training end to end (memtune train's loop, evaluation by recall@k) -----------------------------------------
def _run(tmp_path, name, **overrides):
    args = dict(model=ALIAS, method="sherl", task="digits-captions", out=str(tmp_path / name), batch_size=32,
                train_limit=300, test_limit=100, max_length=32, progress=False, seed=0, lr=3e-3,
                options={"hardest_negative": "false"})
    return train(TrainArgs(**{**args, **overrides}))


def test_train_on_digit_captions_beats_the_untrained_model(tmp_path, capsys):
    metrics = _run(tmp_path, "run", max_steps=80, eval_before=True)
    keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")
    assert metrics["main_metric"] == "rsum" and metrics["task_metrics"][0] == "rsum"
    assert metrics["config"]["form"] == "retrieval" and metrics["eval_examples"] == 100
    for record in (metrics, metrics["before"]):
        for k in keys:
            assert 0.0 <= record[k] <= 1.0, k
        for d in ("i2t", "t2i"):
            assert record[f"{d}_r1"] <= record[f"{d}_r5"] <= record[f"{d}_r10"]
        assert abs(record["rsum"] - sum(record[k] for k in keys)) <= 1e-9
    # Untrained towers give near-equal embeddings (a chance-level ranking); training separates the classes.
    assert metrics["rsum"] > metrics["before"]["rsum"] + 0.5, (metrics["rsum"], metrics["before"]["rsum"])
    loaded = memtune.load(ALIAS, tmp_path / "run")
    assert isinstance(loaded, SHERLRetrievalModel) and loaded.method_config.hardest_negative is False
    # `memtune eval` reloads the adapter and reproduces the recall figures on the same test split.
    from memtune.cli import main

    capsys.readouterr()
    assert main(["eval", "--model", ALIAS, "--adapter", str(tmp_path / "run"), "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["main_metric"] == "rsum"
    for k in (*keys, "rsum"):
        assert evaluated[k] == pytest.approx(metrics[k], abs=1e-9), k


def test_train_refuses_a_method_without_a_retrieval_form(tmp_path):
    from memtune.train import ArgumentError

    with pytest.raises(ArgumentError, match="methods with a retrieval form: sherl"):
        _run(tmp_path, "lora", method="lora", options={}, max_steps=1)
    with pytest.raises(ArgumentError, match="leave --objective at its default"):
        _run(tmp_path, "s2s", objective="seq2seq", max_steps=1)
    with pytest.raises(ArgumentError, match="holds image_caption data .* pick a image_text model"):
        _run(tmp_path, "bert", model="tiny-bert", max_steps=1)


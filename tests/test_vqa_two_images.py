"""Two-image examples (NLVR²-style, VQA template B5; specs/vl.md §2.1, §5.3, §5.8, §6): collation into
pixel_values_2, 2V = 72 visual tokens with image ids [0]×36 + [1]×36 and the image-order embedding E_img, LST-VL's
side sequence T+72 beside the baselines' prefix 72+T, the backbone independent of both images, `memtune train` on
B5 and on a user file with an image2 column, beam search on the T5 composition, and how B5 is scored."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import memtune
from memtune.backbones.visual_embedding import VisualEmbedding
from memtune.cli import main
from memtune.data import TaskError, load_task, make_collate
from memtune.data.collate import ImageCollator
from memtune.evaluation import evaluate
from memtune.methods import ConfigError, config_for
from memtune.seq2seq import greedy_generate, label_targets

from .methods.test_lst_vl import first_side_bias
from .test_vqa_training import train_and_eval as vqa_train_and_eval

V = 36                 # grid 6: 6×6 visual tokens per image
IMAGE = 64             # tiny-vit patch 8: an 8×8 patch grid, pooled to 6×6
IDS = torch.tensor([0] * V + [1] * V)          # the image ids of a two-image example


def wrap(alias="tiny-vl-t5", method="lst", num_labels=None, seed=0, **opts):
    torch.manual_seed(seed)
    return memtune.wrap(memtune.load_model(alias), config_for(method, opts), num_labels=num_labels)


def pair_batch(model, b=3, t=7, seed=1):
    """Token ids B×T (example 0 right-padded by 3), two images per example B×3×64×64 each, targets B×4 (or class
    labels)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t - 3:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask,
             "pixel_values": torch.rand(b, 3, IMAGE, IMAGE, generator=g),
             "pixel_values_2": torch.rand(b, 3, IMAGE, IMAGE, generator=g)}
    batch["labels"] = (torch.randint(5, 60, (b, 4), generator=g) if model.objective == "seq2seq"
                       else torch.arange(b) % model.num_labels)
    return batch


def swapped(batch):
    return {**batch, "pixel_values": batch["pixel_values_2"], "pixel_values_2": batch["pixel_values"]}


def visual_embeddings(model):
    """The visual embeddings a model trains: LST's side embedding, or the baselines' prefix."""
    return model.visual if getattr(model, "visual", None) is not None else model.backbone.visual_prefix


def randomize(model, seed=3):
    """Larger output weights and distinct E_img rows, so outputs vary with the inputs and with image order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if hasattr(model, "up"):
            model.up.weight.copy_(torch.randn(model.up.weight.shape, generator=g) * 3)
            for s in model.stacks.values():
                for lad in s.ladders.values():
                    lad.weight.copy_(torch.randn(lad.weight.shape, generator=g) * 0.3)
        emb = visual_embeddings(model)
        emb.image_order.copy_(torch.randn(emb.image_order.shape, generator=g))
    return model


# -- data: the task and its collation -------------------------------------------------------------------------
def test_b5_is_a_two_image_task_and_template_sets_leave_it_out():
    task = load_task("digits-vqa/B5")
    assert task.kind == "image_text" and task.name == "digits-vqa/B5" and task.label_names == ["true", "false"]
    assert (len(task.train), len(task.test)) == (2000, 500)
    assert all(set(ex) == {"text", "image", "image2", "label", "template"} for ex in task.train + task.test)
    assert all(ex["image"].shape == ex["image2"].shape == (8, 8) for ex in task.train)
    fashion = load_task("fashion-vqa/B5", train_limit=4, test_limit=4)
    assert fashion.label_names == ["true", "false"] and fashion.train[0]["image2"].shape == (28, 28)
    # The template sets stay one-image (their batches would mix V and 2V visual tokens otherwise).
    every = load_task("digits-vqa", train_limit=200, test_limit=20)
    assert not any("image2" in ex for ex in every.train + every.test)
    assert "B5" not in {ex["template"] for ex in every.train} and "true" not in every.label_names


def test_collate_gives_the_second_image_as_pixel_values_2():
    loaded = memtune.load_model("tiny-vl-bert")
    task = load_task("digits-vqa/B5", train_limit=6, test_limit=2)
    batch = make_collate(task.kind, loaded.preprocessor, max_length=32)(task.train)
    proc = loaded.preprocessor.image_processor
    images = ImageCollator(32, proc.image_mean, proc.image_std)
    first = images(task.train)["pixel_values"]
    second = images([{**ex, "image": ex["image2"]} for ex in task.train])["pixel_values"]
    assert batch["pixel_values"].shape == batch["pixel_values_2"].shape == (6, 3, 32, 32)
    assert torch.equal(batch["pixel_values"], first) and torch.equal(batch["pixel_values_2"], second)
    same = [i for i, ex in enumerate(task.train) if (ex["image"] == ex["image2"]).all()]
    assert all(not torch.equal(first[i], second[i]) for i in range(6) if i not in same)
    one = load_task("digits-vqa/B1", train_limit=2, test_limit=2).train
    assert "pixel_values_2" not in make_collate("image_text", loaded.preprocessor, max_length=32)(one)
    with pytest.raises(TaskError, match=r"mixes one-image and two-image examples \(examples \[0\].*\[1\]"):
        make_collate("image_text", loaded.preprocessor, max_length=32)([task.train[0], one[0]])


def test_image_ablation_blanks_both_images():
    from memtune.data.vqa_task import ablate

    examples = load_task("digits-vqa/B5", train_limit=4, test_limit=4).test
    for ex, b in zip(examples, ablate(examples, "image")):
        assert not b["image"].any() and not b["image2"].any() and ex["image2"].any()
        assert b["image2"].shape == ex["image2"].shape and b["text"] == ex["text"]


# -- §5.3: shapes and image ids -----------------------------------------------------------------------------------
def test_each_image_is_pooled_on_its_own_to_36_tokens():
    model = wrap().eval()
    bb = model.backbone
    batch = pair_batch(model)
    v = bb.visual_tokens(batch)
    assert bb.grid == 6 and bb.visual_length == V and bb.visual_images(batch) == 2
    assert v.shape == (3, 2 * V, 64) and v.grad_fn is None
    # Image 0's tokens, then image 1's: each bit for bit the one-image result of that image.
    assert torch.equal(v[:, :V], bb.visual_tokens({"pixel_values": batch["pixel_values"]}))
    assert torch.equal(v[:, V:], bb.visual_tokens({"pixel_values": batch["pixel_values_2"]}))
    with pytest.raises(ValueError, match="pixel_values_2 .* shape \\(3, 3, 32, 32\\)"):
        bb.visual_tokens({**batch, "pixel_values_2": torch.rand(3, 3, 32, 32)})


def test_visual_embedding_adds_image_ids_and_shares_position_codes():
    emb = VisualEmbedding(64, 48, V)
    with torch.no_grad():
        emb.type_code.normal_()
        emb.image_order.normal_()
    v = torch.randn(2, 2 * V, 64)
    base = emb.norm(emb.proj(v)) + emb.type_code                          # B×2V×48
    # e_v[k] = Norm(W_v v[k] + b_v) + t_v + p_(k mod V) + E_img[id_k], ids [0]×36 + [1]×36.
    expected = base + torch.cat([emb.position_codes, emb.position_codes]) + emb.image_order[IDS]
    assert torch.equal(emb(v), expected)
    assert (IDS[:V] == 0).all() and (IDS[V:] == 1).all() and IDS.shape == (72,)
    with pytest.raises(ValueError, match="got 40 visual tokens .* 36 for one image or 72 for two"):
        emb(torch.randn(2, 40, 64))


def test_one_image_output_is_unchanged_while_e_img_is_zero():
    emb = VisualEmbedding(64, 48, V)
    assert torch.count_nonzero(emb.image_order) == 0 and emb.image_order.shape == (2, 48)
    v = torch.randn(2, V, 64)
    assert torch.equal(emb(v), emb.norm(emb.proj(v)) + emb.type_code + emb.position_codes)   # the form without E_img
    # One more trainable row pair: (d_v + 5 + V)·width.
    assert sum(p.numel() for p in emb.parameters()) == VisualEmbedding.parameter_count(64, 48, V) == (64 + 5 + V) * 48


def test_lst_t5_backbone_reads_t_and_side_reads_t_plus_72():
    model = wrap().eval()
    batch = pair_batch(model, t=7)
    lengths = {}

    def record(key):
        def hook(module, args, output):
            lengths.setdefault(key, args[0].shape[1])
        return hook
    bb = model.backbone
    hooks = [bb.blocks[0].register_forward_hook(record("backbone encoder")),
             bb.decoder_blocks[0].layer[1].EncDecAttention.k.register_forward_hook(record("backbone cross keys")),
             model.stacks["encoder"].blocks["0"].register_forward_hook(record("side encoder")),
             model.stacks["decoder"].blocks["0"].layer[1].EncDecAttention.k.register_forward_hook(
                 record("side cross keys"))]
    with torch.no_grad():
        taps, ctx = model.backbone_taps({**batch, "decoder_input_ids": bb.shift_right(batch["labels"])})
        s_enc = model.side_encode(taps["encoder"], ctx)
        model.side_decode(taps["decoder"], s_enc, ctx)
    for h in hooks:
        h.remove()
    assert taps["encoder"]["visual"].shape == (3, 72, 64) and ctx["memory"].shape == (3, 7, 64)
    assert s_enc.shape == (3, 7 + 72, model.side_configs["encoder"].d_model)
    assert lengths == {"backbone encoder": 7, "backbone cross keys": 7, "side encoder": 79, "side cross keys": 79}


def test_t5_side_bias_stays_text_text_with_72_visual_tokens(monkeypatch):
    model = wrap().eval()
    batch = pair_batch(model)
    T = batch["input_ids"].shape[1]
    bias, mask = first_side_bias(model, batch, monkeypatch)
    unmasked = bias - mask
    assert mask.shape == (3, 1, T + 72, T + 72) and (mask[:, :, :, T:] == 0).all()
    text_bias = model.stacks["encoder"].blocks["0"].layer[0].SelfAttention.compute_bias(T, T)
    assert torch.equal(unmasked[1:, :, :T, :T], text_bias.expand(2, -1, -1, -1))
    assert (unmasked[:, :, T:] == 0).all() and (unmasked[:, :, :, T:] == 0).all()


def test_lst_bert_side_runs_over_t_plus_72_and_pools_them():
    model = wrap("tiny-vl-bert", num_labels=2).eval()
    batch = pair_batch(model, t=7)
    lengths = []
    hook = model.stacks["encoder"].blocks["0"].register_forward_hook(lambda m, a, o: lengths.append(a[0].shape[1]))
    with torch.no_grad():
        taps, ctx = model.backbone_taps(batch)
        out = model.side_forward(taps, ctx)                                # B×(T+72)×d
        feats = model.features(batch)
    hook.remove()
    assert lengths == [79, 79] and out.shape == (3, 79, 64) and ctx["token_mask"].shape == (3, 7)
    real = torch.cat([batch["attention_mask"], torch.ones(3, 72, dtype=torch.long)], dim=1).float()[..., None]
    assert torch.allclose(feats, (out * real).sum(1) / real.sum(1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("alias,num_labels", [("tiny-vl-bert", 2), ("tiny-vl-t5", None)], ids=["bert", "t5"])
def test_lora_prefix_is_72_plus_t(alias, num_labels):
    model = wrap(alias, "lora", num_labels).eval()
    bb = model.backbone
    batch = pair_batch(model, t=7)
    lengths = []
    hook = bb.blocks[0].register_forward_hook(lambda m, a, o: lengths.append(a[0].shape[1]))
    with torch.no_grad():
        h, ctx = bb.embed(batch)
        model(**batch)
    hook.remove()
    assert h.shape == (3, 72 + 7, bb.hidden_size) and ctx["visual_prefix_length"] == 72 and lengths == [79]
    assert torch.equal(ctx["token_mask"], torch.cat([torch.ones(3, 72, dtype=torch.long), batch["attention_mask"]], 1))
    with torch.no_grad():
        assert torch.equal(h[:, :72], bb.visual_prefix(bb.visual_tokens(batch)))


# -- image order and independence of the backbone -------------------------------------------------------------
# LST's side attention over [text ; image 0 ; image 1] has no position term between visual tokens (the T5 side
# bias is text-text only, BERT's side reads no positions there), and the pooling and the side decoder's
# cross-attention are sums over positions, so with E_img = 0 swapping the two images only permutes terms of
# sums: the outputs agree to fp32 rounding (a few ulps of values of order 10: 1e-5 is ample). With distinct
# E_img rows the swap is a different input.
SWAP_FORMS = [("tiny-vl-t5", "lst", None), ("tiny-vl-bert", "lst", 2), ("tiny-vl-bert", "lora", 2)]


@pytest.mark.parametrize("alias,method,num_labels", SWAP_FORMS, ids=["lst-t5", "lst-bert", "lora-bert"])
def test_swapping_the_images_matters_only_through_e_img(alias, method, num_labels):
    model = wrap(alias, method, num_labels).eval()
    batch = pair_batch(model)
    emb = visual_embeddings(model)
    with torch.no_grad():
        if hasattr(model, "up"):
            model.up.weight.mul_(300)                      # outputs away from 0, so a change shows
        at_init = [model(**b).logits for b in (batch, swapped(batch))]
        assert torch.count_nonzero(emb.image_order) == 0
        assert torch.allclose(*at_init, atol=1e-5, rtol=1e-5) and at_init[0].abs().max() > 1e-2
        emb.image_order.copy_(torch.randn(emb.image_order.shape, generator=torch.Generator().manual_seed(4)))
        a, b = (model(**x).logits for x in (batch, swapped(batch)))
        assert not torch.allclose(a, b, atol=1e-3, rtol=1e-3)
        # Two equal images: the swap is the same input, whatever E_img.
        equal = {**batch, "pixel_values_2": batch["pixel_values"]}
        assert torch.equal(model(**equal).logits, model(**swapped(equal)).logits)
        assert not torch.equal(model(**equal).logits, a)


@pytest.mark.parametrize("alias,num_labels", [("tiny-vl-t5", None), ("tiny-vl-bert", 2)], ids=["t5", "bert"])
def test_lst_backbone_states_are_bit_identical_under_other_images(alias, num_labels):
    model = randomize(wrap(alias, num_labels=num_labels)).eval()
    batch = pair_batch(model)
    g = torch.Generator().manual_seed(9)
    others = [{**batch, "pixel_values_2": torch.rand(3, 3, IMAGE, IMAGE, generator=g)}, swapped(batch),
              {k: v for k, v in batch.items() if k != "pixel_values_2"}]            # one image: 36 tokens
    bb = model.backbone
    blocks = list(bb.blocks) + (list(bb.decoder_blocks) if bb.is_encoder_decoder else [])
    runs = []
    for b in (batch, *others):
        states = []
        hooks = [blk.register_forward_hook(lambda m, a, o: states.append(o[0] if isinstance(o, tuple) else o))
                 for blk in blocks]
        with torch.no_grad():
            logits = model(**b).logits
        for h in hooks:
            h.remove()
        runs.append((states, logits))
    first, logits = runs[0]
    assert len(first) == len(blocks)
    for states, other in runs[1:]:
        assert all(torch.equal(x, y) for x, y in zip(first, states))
        assert not torch.allclose(logits, other)                           # the side network sees the images


def test_lst_two_image_gradients_reach_the_visual_embedding_and_e_img_only_on_the_side():
    model = wrap("tiny-vl-bert", num_labels=2).train()
    model(**pair_batch(model)).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    for n, p in model.visual.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert (model.visual.image_order.grad.abs().sum(-1) > 0).all()         # both rows (one per image) train


# -- the CLI, end to end ----------------------------------------------------------------------------------------
def train_and_eval(capsys, tmp_path, model, task, method, *extra):
    """The VQA CLI round trip on 16 / 8 examples, 2 steps: (metrics.json, eval's JSON, the run folder)."""
    return (*vqa_train_and_eval(capsys, tmp_path, model, task, method, *extra, train_limit=16, test_limit=8,
                                steps=2), tmp_path / method)


@pytest.mark.parametrize("method", ["lst", "lora"])
def test_cli_trains_b5(method, capsys, tmp_path):
    metrics, evaluated, out = train_and_eval(capsys, tmp_path, "tiny-vl-bert", "digits-vqa/B5", method)
    assert metrics["task"] == "digits-vqa/B5" and metrics["steps"] == 2 and metrics["test_examples"] == 8
    assert 0.0 <= metrics["accuracy"] <= 1.0 and evaluated["accuracy"] == metrics["accuracy"]
    model = memtune.load("tiny-vl-bert", out)
    emb = visual_embeddings(model)
    trained = {n for n, _ in model.trainable_named_parameters()}
    assert any(n.endswith("image_order") for n in trained)
    assert torch.count_nonzero(emb.image_order) > 0                        # E_img moved off zero in training


def test_cli_trains_b5_text_to_text_with_lst_on_t5(capsys, tmp_path):
    metrics, evaluated, _ = train_and_eval(capsys, tmp_path, "tiny-vl-t5", "digits-vqa/B5", "lst",
                                           "--objective", "seq2seq")
    for key in ("accuracy", "accuracy_scored", "invalid_generations"):
        assert evaluated[key] == metrics[key], key


def test_cli_trains_a_user_file_with_image2(capsys, tmp_path):
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    names = []
    for i in range(4):
        name = f"img{i}.png"
        Image.fromarray((torch.rand(10, 10, 3, generator=rng) * 255).to(torch.uint8).numpy()).save(tmp_path / name)
        names.append(name)
    rows = [(names[i % 4], names[(i + (i % 2)) % 4], "same picture?", "yes" if i % 2 == 0 else "no",
             "train" if i < 12 else "test") for i in range(16)]
    path = tmp_path / "Pairs.csv"                                          # the path keeps its case
    path.write_text("image,image2,question,answer,split\n" + "".join(",".join(r) + "\n" for r in rows))
    task = load_task(f"vqa:{path}")
    assert task.kind == "image_text" and task.label_names == ["no", "yes"] and len(task.train) == 12
    assert all(ex["image2"].shape == (10, 10, 3) for ex in task.train + task.test)
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-vl-bert", "--task", f"vqa:{path}", "--method", "lst", "--batch-size", "4",
                 "--max-steps", "2", "--max-length", "16", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["test_examples"] == 4
    with pytest.raises(TaskError, match="give a file path after 'vqa:'"):
        load_task("vqa:")


# -- §5.8: generation and scoring on the T5 composition -------------------------------------------------------------
def test_beam_search_with_72_visual_tokens_matches_batch_of_one():
    model = randomize(wrap()).eval()
    batch = pair_batch(model)                                               # example 0 right-padded
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_values_2")}
    keys = []
    hook = model.stacks["decoder"].blocks["0"].layer[1].EncDecAttention.k.register_forward_hook(
        lambda m, a, o: keys.append(tuple(a[0].shape[:2])))
    beams = model.generate(**inputs, max_new_tokens=5, num_beams=3)
    hook.remove()
    # The side decoder's cross-attention keys are computed once (then cached) over the expanded s_enc: B·k rows of
    # T+72 positions.
    assert keys == [(9, 7 + 72)]
    single = torch.cat([model.generate(**{k: v[i:i + 1] for k, v in inputs.items()}, max_new_tokens=5, num_beams=3)
                        for i in range(3)])
    assert beams.shape[0] == 3 and torch.equal(single, beams)
    perm = torch.tensor([2, 0, 1])
    assert torch.equal(model.generate(**{k: v[perm] for k, v in inputs.items()}, max_new_tokens=5, num_beams=3),
                       beams[perm])
    # num_beams = 1 is greedy, and equals greedy decoding through the forward (which reads the same 72 tokens).
    greedy = model.generate(**inputs, max_new_tokens=5, stop_at_eos=False)
    assert torch.equal(greedy[:, 1:], greedy_generate(model, inputs, 5, eos_id=-1))
    # The second image is read: the teacher-forced logits of the decoded tokens change without it.
    with torch.no_grad():
        both = model(**inputs, decoder_input_ids=greedy).logits
        one_image = model(**{k: v for k, v in inputs.items() if k != "pixel_values_2"},
                          decoder_input_ids=greedy).logits
    assert (both - one_image).abs().max() > 1e-3 * both.abs().max()
    assert len(set(greedy[:, 1:].flatten().tolist())) > 2
    with pytest.raises(ConfigError, match="needs pixel_values"):
        model.generate(batch["input_ids"])
    with pytest.raises(ConfigError, match="reads text only"):
        wrap("tiny-t5").generate(batch["input_ids"], pixel_values=batch["pixel_values"])


def test_b5_scoring_compares_the_label_word_sequence_scores():
    """memtune's text-to-text evaluation scores a two-class task by the teacher-forced log-likelihood of each label
    word sequence, EOS included ("accuracy_scored"), not by the first-step logits alone: with the tiny tokenizer
    "true" and "false" are several tokens each (on T5's own vocabulary each is one token, and the sum is then the
    first-step log-probability plus that of EOS after it)."""
    model = randomize(wrap()).eval()
    loaded = memtune.load_model("tiny-vl-t5")
    eos = model.backbone.config.eos_token_id
    task = load_task("digits-vqa/B5", train_limit=2, test_limit=12)
    targets = label_targets(loaded.preprocessor, task.label_names, eos)
    assert task.label_names == ["true", "false"] and all(t[-1] == eos for t in targets) and len(targets[0]) > 2
    collate = make_collate(task.kind, loaded.preprocessor, max_length=24, image_size=IMAGE, label_targets=targets)
    metrics = evaluate(model, task.test, collate, batch_size=5, device="cpu")
    batch = collate(task.test)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_values_2")}
    scores = []
    with torch.no_grad():
        for t in targets:
            t = torch.tensor(t).expand(len(task.test), -1)                   # B×Lc
            logits = model(**inputs, decoder_input_ids=model.backbone.shift_right(t)).logits
            scores.append(-F.cross_entropy(logits.transpose(1, 2), t, reduction="none").sum(-1))   # B
    best = torch.stack(scores, -1).argmax(-1)                                   # B
    assert metrics["accuracy_scored"] == pytest.approx((best == batch["label_ids"]).float().mean().item())
    assert metrics["eval_examples"] == 12
    # The score depends on the images: blanking the second one changes some sequence score.
    with torch.no_grad():
        t = torch.tensor(targets[0]).expand(len(task.test), -1)
        blank = model(**{**inputs, "pixel_values_2": torch.zeros_like(inputs["pixel_values_2"])},
                      decoder_input_ids=model.backbone.shift_right(t)).logits
    assert not torch.allclose(-F.cross_entropy(blank.transpose(1, 2), t, reduction="none").sum(-1), scores[0])


def test_planning_and_example_batches_can_hold_two_images():
    bb = wrap().backbone
    batch = bb.example_batch(2, 5, images=2)
    assert batch["pixel_values"].shape == batch["pixel_values_2"].shape == (2, 3, 32, 32)
    assert bb.visual_tokens(batch).shape == (2, 72, 64)
    planned = bb.planning_batch(bb.config, 2, 5, images=2)
    assert planned["pixel_values_2"].device.type == "meta" and "pixel_values_2" in bb.input_keys
    assert "pixel_values_2" not in bb.example_batch(2, 5)
    with pytest.raises(ValueError, match="must be 1 or 2"):
        bb.example_batch(2, 5, images=3)


def test_side_input_at_visual_positions_keeps_the_image_order():
    """Before side block 0 the side state at the 72 visual positions is W0·e_v: image 0's 36 rows, then image 1's."""
    model = wrap().eval()
    batch = pair_batch(model)
    T = batch["input_ids"].shape[1]
    seen = []
    stack = model.stacks["encoder"]
    hook = stack.blocks["0"].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(**batch)
        e_v = model.visual(model.backbone.visual_tokens(batch))                # B×72×d
        s0 = stack.start(torch.cat([model.backbone.raw_embedding(batch["input_ids"]), e_v], dim=1))
    hook.remove()
    assert seen[0].shape[1] == T + 72
    assert torch.equal(seen[0][:, T:], stack.mu(0) * s0[:, T:])

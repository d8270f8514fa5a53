"""QST on encoder-decoders (tiny-t5, tiny-bart): a side encoder over the encoder blocks, a side decoder over the
decoder blocks that cross-attends to the side encoder, and the output mix on the decoder output
(methods/qst/encoder_decoder.py, docs/methods/qst.md "Encoder-decoders").

fp32 and seeded throughout: the starting point (paper mix), the trainable set and its gradients, no autograd graph
in either backbone stack, exact parameter counts from the shapes, refused options, side checkpointing, save/load
and the CLI (classification and text-to-text).
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

import memtune
from memtune.cli import main
from memtune.methods import ConfigError, config_for
from memtune.methods.qst import QSTModel

from ..conftest import has_package
from .side_helpers import (assert_blocks_keep_no_graph, assert_quantized_start_and_training,
                           assert_side_checkpointing_matches, fit_fixed_batch)

NAMES = ["tiny-t5", "tiny-bart"]
OBJECTIVES = ["classification", "seq2seq"]
CLASSES = 3
EOS = {"tiny-t5": 1, "tiny-bart": 3}           # T5Config's default eos id; tiny-bart's [SEP]


def wrap(name, objective="classification", seed=0, **opts):
    """tiny-t5 / tiny-bart with QST (r = 4 unless given: d' = 16, head width 4, so the side is not trivially thin)."""
    opts.setdefault("r", 4)
    torch.manual_seed(seed)
    return memtune.wrap(memtune.load_model(name), config_for("qst", opts),
                        num_labels=CLASSES if objective == "classification" else None)


def batch_for(model, b=3, t=9, seed=1):
    """B×T source ids, the first row right-padded by 3. Classification: class labels (the decoder reads the
    backbone's default input: T5 one start token, BART the input shifted right). Text-to-text: target ids B×4
    (one row with a -100 pad), which the forward shifts right into the decoder input."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 60, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t - 3:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if model.objective == "seq2seq":
        labels = torch.randint(5, 60, (b, 4), generator=g)
        labels[1, -1] = -100
        batch["labels"] = labels
    else:
        batch["labels"] = torch.arange(b) % CLASSES
    return batch


def randomize_side(model, seed=5):
    """Random weights in both side stacks (not the mix), so that a check cannot pass by zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.side.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def reference_decoder_output(model, batch):
    """The frozen backbone's finished decoder states B×Tt×d from the Hugging Face module's own forward."""
    bb = model.backbone
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    if model.objective == "seq2seq":
        dec = bb.shift_right(batch["labels"])
    else:
        dec = bb.decoder_ids(inputs)                       # T5: the start token; BART: the input shifted right
    return bb.model(**inputs, decoder_input_ids=dec).last_hidden_state


# -- 1. the starting point -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("name", NAMES)
def test_paper_mix_starts_at_the_backbone_for_any_side_weights(name, objective):
    model = wrap(name, objective).eval()
    randomize_side(model)
    batch = batch_for(model)
    with torch.no_grad():
        ref = reference_decoder_output(model, batch)
        logits = model(**batch).logits
        if objective == "seq2seq":
            batch = {**batch, "decoder_input_ids": model.backbone.shift_right(batch["labels"])}
        o, ctx, g_final = model.mixed_output(batch)
        u = model.side.decoder.finish(torch.zeros(1, 1, model.side.configs["decoder"].hidden_size))
    # α = 1: o = 1·g_N + 0·u is g_N exactly for any finite side output; the memtune block loop and the Hugging
    # Face forward run the same kernels, so 1e-5 relative is fp32 rounding over 4 + 4 blocks.
    assert torch.equal(o, g_final) and torch.isfinite(u).all()
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-6)
    if objective == "seq2seq":
        expected = model.backbone.tied_lm_logits(ref)                      # B×Tt×V through the tied LM head
        assert logits.shape == (3, 4, model.backbone.config.vocab_size)
    else:
        expected = model.head(model.backbone.pool(ref, ctx))               # B×C
        assert logits.shape == (3, CLASSES)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert torch.all(model.mix.weight == 1)


def test_side_decoder_reads_the_side_encoder_only():
    """The side decoder's cross-attention memory is the side encoder output (B×Ts×d'), with the source mask."""
    model = wrap("tiny-t5", "seq2seq").eval()
    seen = []
    block = model.side.decoder.blocks[0]
    block.register_forward_hook(lambda m, args, kwargs, out: seen.append(args[3]), with_kwargs=True)
    outs = []
    model.side.encoder.norm.register_forward_hook(lambda m, a, o: outs.append(o))
    batch = batch_for(model)
    with torch.no_grad():
        model(**batch)
    d_side = model.side.configs["decoder"].hidden_size
    assert seen[0].shape == (3, 9, d_side) and seen[0] is outs[0]


# -- 2. what trains ------------------------------------------------------------------------------------------------
# A T5 classifier's decoder reads one position (the start token): self-attention over a single key is a softmax
# of one score, identically 1, so the side decoder's self-attention q, k and relative bias get exactly zero
# gradient (as the backbone's would); every other trainable tensor moves.
SINGLE_KEY = re.compile(r"^side\.decoder\.blocks\.\d+\.layer\.0\.SelfAttention\.(q|k|relative_attention_bias)\.")


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("name", NAMES)
def test_exactly_the_side_stacks_the_mix_and_the_head_get_gradients(name, objective):
    model = wrap(name, objective).train()
    batch = batch_for(model)
    model(**batch).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    declared = {n for n, _ in model.trainable_named_parameters()}
    expected = {"mix.weight", "side.decoder.up.weight", "side.decoder.up.bias"}
    for stack, blocks in (("encoder", model.backbone.blocks), ("decoder", model.backbone.decoder_blocks)):
        side = getattr(model.side, stack)
        expected.add(f"side.{stack}.gates")
        for i in range(len(blocks)):
            expected |= {f"side.{stack}.downsamples.{i}.{w}" for w in ("down.weight", "up.weight", "norm.weight",
                                                                       "norm.bias")}
            expected |= {f"side.{stack}.blocks.{i}.{n}" for n, _ in side.blocks[i].named_parameters()}
        expected |= {f"side.{stack}.norm.{n}" for n, _ in side.norm.named_parameters()}
    assert model.side.encoder.up is None                                   # s_enc stays at width d'
    if objective == "classification":
        expected |= {"head.weight", "head.bias"}
    assert got == expected == declared
    # Paper form at the start: α = 1, so ∂o/∂u = 1 − α = 0 and the first step reaches only α (and the head).
    assert model.mix.weight.grad.abs().sum() > 0
    assert all(torch.all(p.grad == 0) for n, p in model.named_parameters() if n.startswith("side."))
    if model.head is not None:
        assert model.head.weight.grad.abs().sum() > 0
    torch.optim.SGD([p for _, p in model.trainable_named_parameters()], lr=0.1).step()
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    zero = {n for n in declared if name == "tiny-t5" and objective == "classification" and SINGLE_KEY.match(n)}
    assert len(zero) == (9 if zero else 0)                 # q, k in 4 side decoder blocks + block 0's bias table
    for n, p in model.trainable_named_parameters():
        if n in zero:
            assert torch.all(p.grad == 0), n
        else:
            assert p.grad.abs().sum() > 0, n


# -- 3. no graph through the backbone --------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("name", NAMES)
def test_no_backbone_block_records_a_graph(name, objective):
    model = wrap(name, objective).train()
    bb = model.backbone
    blocks = list(bb.blocks) + list(bb.decoder_blocks)
    assert [id(b) for b in model.graph_free_blocks()] == [id(b) for b in blocks]
    assert_blocks_keep_no_graph(model, blocks, batch_for(model))


# -- 4. parameter counts from the shapes ------------------------------------------------------------------------------
def downsample_and_gate(d, ds, k):
    return k * (d + ds) + 2 * ds + ds                       # adapter W_A, W_B, post-LN; one vector gate z_i


def t5_side_count(cfg, r, k=16):
    """Side encoder + side decoder + Up (α and the head excluded) of a relu T5 at exact side widths."""
    d, ds, kv, fs, H = cfg.d_model, cfg.d_model // r, cfg.num_heads * (cfg.d_kv // r), cfg.d_ff // r, cfg.num_heads
    attention = 4 * ds * kv                                  # q, k, v: d'→H·d_kv', o: H·d_kv'→d', no biases
    enc_block = attention + 2 * ds * fs + 2 * ds             # + FFN wi, wo and two RMS norms (weight only)
    dec_block = enc_block + attention + ds                   # + cross-attention and its norm
    bias_table = cfg.relative_attention_num_buckets * H      # side block 0 of each stack
    enc = cfg.num_layers * (enc_block + downsample_and_gate(d, ds, k)) + bias_table + ds
    dec = cfg.num_decoder_layers * (dec_block + downsample_and_gate(d, ds, k)) + bias_table + ds
    return enc + dec + ds * d + d


def bart_side_count(cfg, r, k=16):
    """The same for BART (biases everywhere, post-LN: no side final norm)."""
    d, ds = cfg.d_model, cfg.d_model // r
    attention = 4 * (ds * ds + ds) + 2 * ds                  # q, k, v, o with biases, and the LayerNorm after
    ffn_enc = 2 * ds * (cfg.encoder_ffn_dim // r) + cfg.encoder_ffn_dim // r + ds + 2 * ds
    ffn_dec = 2 * ds * (cfg.decoder_ffn_dim // r) + cfg.decoder_ffn_dim // r + ds + 2 * ds
    enc = cfg.encoder_layers * (attention + ffn_enc + downsample_and_gate(d, ds, k))
    dec = cfg.decoder_layers * (2 * attention + ffn_dec + downsample_and_gate(d, ds, k))
    return enc + dec + ds * d + d


@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize("name", NAMES)
def test_trainable_count_is_the_sum_over_the_shapes(name, r):
    model = wrap(name, r=r)
    cfg, d = model.backbone.config, model.backbone.hidden_size
    count = t5_side_count if name == "tiny-t5" else bart_side_count
    side = sum(p.numel() for n, p in model.trainable_named_parameters() if n.startswith("side."))
    assert side == count(cfg, r)
    assert model.num_parameters_split()[0] == count(cfg, r) + d + (d * CLASSES + CLASSES)   # + α + head


def test_parameter_count_at_t5_base_shapes_on_the_meta_device():
    from transformers import T5Config, T5Model

    cfg = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12)
    with torch.device("meta"):
        model = memtune.wrap(T5Model(cfg), config_for("qst", {}), num_labels=None)
    assert model.r == 16 and model.side.configs["encoder"].d_kv == 4 and model.side.configs["decoder"].d_ff == 192
    side = sum(p.numel() for n, p in model.trainable_named_parameters() if n.startswith("side."))
    # d' = 48, H·d_kv' = 48, f' = 192: encoder 12·(27,744 + 13,200) + 384 + 48 = 491,760, decoder
    # 12·(37,008 + 13,200) + 432 = 602,928, Up 48·768 + 768 = 37,632 (block + adapter and gate per layer).
    assert side == t5_side_count(cfg, 16) == 1_132_320
    assert model.num_parameters_split()[0] == side + 768


# -- options ------------------------------------------------------------------------------------------------------
def test_options_that_do_not_apply_are_refused():
    with pytest.raises(ConfigError, match=r"qst.cache_trunk is supported for single-stack backbones .* not the t5 "
                                          r"encoder-decoder"):
        wrap("tiny-t5", cache_trunk=True, trunk_dropout=False)
    with pytest.raises(ConfigError, match=r"qst.side_heads=2"):
        wrap("tiny-t5", side_heads=2)
    model = wrap("tiny-t5", "seq2seq")
    ids = torch.randint(5, 60, (2, 5))
    with pytest.raises(ConfigError, match=r"qst.generate .* memtune.seq2seq.greedy_generate"):
        model.generate(ids)
    # T5's heads are d_kv = 16 wide: d_kv/r must be whole (r = 32 would give no head dims at all).
    with pytest.raises(ConfigError, match=r"qst.r=32 .*head width d_kv=16 is not divisible by r=32; "
                                          r"r values that fit: 1, 2, 4, 8, 16$"):
        wrap("tiny-t5", r=32)
    with pytest.raises(ConfigError, match=r"qst.r=3 .*d=64 is not divisible by r=3"):
        wrap("tiny-bart", r=3)


def test_generic_greedy_generation_decodes_through_the_forward():
    from memtune.seq2seq import greedy_generate

    model = wrap("tiny-t5", "seq2seq", mix="sigmoid").eval()
    batch = batch_for(model)
    x = {k: batch[k] for k in ("input_ids", "attention_mask")}
    out = greedy_generate(model, x, max_new_tokens=3, eos_id=EOS["tiny-t5"])
    assert out.shape[0] == 3 and 1 <= out.shape[1] <= 3
    with torch.no_grad():                  # the first token is the argmax at the start position
        start = model(**x, decoder_input_ids=model.backbone.decoder_ids(x)).logits[:, 0].argmax(-1)
    assert torch.equal(out[:, 0], start)


@pytest.mark.parametrize("name", NAMES)
def test_side_checkpointing_gives_the_same_loss_and_gradients_and_saves_less(name):
    assert_side_checkpointing_matches(lambda ckpt: wrap(name, "seq2seq", mix="sigmoid", side_checkpointing=ckpt),
                                      batch_for)


@pytest.mark.parametrize("downsample", ["avgpool", "linear"])
def test_other_downsamples_train_on_both_stacks(downsample):
    model = wrap("tiny-bart", "seq2seq", downsample=downsample, mix="sigmoid").train()
    model(**batch_for(model)).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    names = {n for n, _ in model.trainable_named_parameters()}
    assert any(n.startswith("side.encoder.downsamples.") for n in names) == (downsample == "linear")
    assert all(p.grad.abs().sum() > 0 for _, p in model.trainable_named_parameters())


@pytest.mark.skipif(not has_package("bitsandbytes"), reason="bitsandbytes not installed")
def test_trains_on_an_nf4_t5_backbone():
    """qst+nf4 on T5: both stacks' linears become NF4 (T5 keeps `wo` in full precision, as transformers' 4-bit
    loading does); QST still starts at the quantized backbone's output and trains without a gradient into it."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = memtune.wrap(memtune.load_model("tiny-t5"), config_for("qst", {"r": 4}), num_labels=CLASSES,
                         techniques="nf4")
    bb = model.backbone
    quantized = [m for b in list(bb.blocks) + list(bb.decoder_blocks) for m in b.modules()
                 if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 4 * 5 + 4 * 9       # per block q, k, v, o, wi; the decoder's cross q, k, v, o too
    batch = batch_for(model, b=4)
    assert_quantized_start_and_training(model, batch)


# -- 5. save / load and the CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("name", NAMES)
def test_save_and_load_give_bit_identical_outputs(name, objective, tmp_path):
    model = wrap(name, objective, mix="sigmoid").train()
    batch = batch_for(model)
    fit_fixed_batch(model, batch, lr=1e-2, steps=2)                 # trained weights to save
    model.eval().save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == {n for n, _ in model.trainable_named_parameters()}
    torch.manual_seed(123)                               # another fresh init: the load must overwrite it
    loaded = memtune.load(name, tmp_path).eval()
    assert isinstance(loaded, QSTModel) and loaded.method_config == model.method_config
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def _class_csv(tmp_path, n=24):
    p = tmp_path / "data.csv"
    p.write_text("text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} text {i},{i % 2}\n" for i in range(n)))
    return p


def _pair_csv(tmp_path, n=48):
    p = tmp_path / "pairs.csv"
    rows = [f"{'a cat' if i % 2 else 'a dog'} {i},the same {i},{'yes' if i % 2 else 'no'}\n" for i in range(n)]
    p.write_text("first,second,label\n" + "".join(rows))
    return p


def _eval_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("name", NAMES)
def test_cli_trains_a_classifier_and_eval_reproduces_it(name, tmp_path, capsys):
    data, run = _class_csv(tmp_path), tmp_path / "run"
    assert main(["train", "--model", name, "--task", f"csv:{data}", "--method", "qst", "--max-steps", "3",
                 "--batch-size", "8", "--out", str(run), "--no-progress"]) == 0
    saved = json.loads((run / "adapter_config.json").read_text())
    assert saved["method"] == "qst" and saved["num_labels"] == 2
    m = json.loads((run / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["eval", "--model", name, "--adapter", str(run), "--no-progress"]) == 0
    out = _eval_line(capsys)
    assert out["accuracy"] == m["accuracy"]


# Steps at lr 3e-2 (default r = 16, d' = 4) for the side path to learn the answer format. It enters through α, which
# starts at 1 and moves by about the learning rate per AdamW step, so it needs more steps than LoRA does
# (test_seq2seq.py: 40 at 1e-2). On these seeds: tiny-t5 60 steps → accuracy 1.0, no invalid generation (40 steps:
# 0.3 invalid); tiny-bart 100 steps → 1.0 and none (60 steps: 0.2 invalid).
TEXT_TO_TEXT_STEPS = {"tiny-t5": "60", "tiny-bart": "100"}


@pytest.mark.parametrize("name", NAMES)
def test_cli_trains_text_to_text_and_eval_reproduces_it(name, tmp_path, capsys):
    p, run = _pair_csv(tmp_path), tmp_path / "run"
    assert main(["train", "--model", name, "--task", f"csv:{p}", "--text-column", "first,second",
                 "--objective", "seq2seq", "--method", "qst", "--max-steps", TEXT_TO_TEXT_STEPS[name],
                 "--batch-size", "8", "--lr", "3e-2", "--max-length", "32", "--out", str(run), "--no-progress"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert {"accuracy", "accuracy_scored", "invalid_generations", "f1"} <= set(m)
    assert m["invalid_generations"] < 0.5              # it has learnt to answer with a label word
    saved = json.loads((run / "adapter_config.json").read_text())
    assert saved["objective"] == "seq2seq" and saved["label_words"] == ["no", "yes"]
    capsys.readouterr()
    assert main(["eval", "--model", name, "--adapter", str(run), "--no-progress"]) == 0
    out = _eval_line(capsys)
    for k in ("accuracy", "accuracy_scored", "invalid_generations", "f1"):
        assert out[k] == m[k]
    assert main(["predict", "--model", name, "--adapter", str(run), "--text", "a cat", "--json"]) == 0
    pred = _eval_line(capsys)
    assert set(pred["probabilities"]) == {"no", "yes"}
    assert sum(pred["probabilities"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", NAMES)
def test_plan_of_the_text_to_text_step_matches_its_measurement(name):
    """The meta-device plan of a seq2seq step (both side stacks, the tied LM head) is within the planner's 5 % of
    the CPU tracker's peak, for the adapter and the parameter-free pooling downsample."""
    from memtune.memory.plan import PlanSettings

    from ..memory.test_plan import assert_agrees

    settings = PlanSettings(model=name, batch_size=2, max_length=16, objective="seq2seq", target_length=4,
                            device="cpu")
    assert assert_agrees(settings, "qst,qst:downsample=avgpool") == 2

"""LST (Ladder Side-Tuning): the checks of docs/methods/lst.md §13 on tiny models, exact counts at T5 shapes on the meta
device, and saved-bytes ratios at T5-base encoder shapes."""
from __future__ import annotations

import pytest
import torch
from transformers import T5Config, T5Model

import memtune
from memtune.memory.saved import count_saved_inside, saved_bytes
from memtune.methods import ConfigError, config_for
from memtune.methods.lst import LSTConfig, LSTModel
from memtune.methods.lst import model as lst_model_module

from .side_helpers import assert_pruning_records_hold, batch_for, fit_fixed_batch, randomize_side

FAMILIES = [("tiny-bert", 3), ("tiny-vit", 3), ("tiny-dinov2", 3), ("tiny-t5", 3), ("tiny-llama", 3),
            ("tiny-llama", None), ("tiny-opt", 3), ("tiny-opt", None), ("tiny-distilbert", 3), ("tiny-gpt2", 3),
            ("tiny-gpt2", None), ("tiny-phi3", 3), ("tiny-phi3", None), ("tiny-gpt-neox", 3), ("tiny-gpt-neox", None),
            ("tiny-clip-vision", 3), ("tiny-siglip-vision", 3), ("tiny-qwen3", 3), ("tiny-qwen3", None),
            ("tiny-gemma2", 3), ("tiny-gemma2", None), ("tiny-gemma3", 3), ("tiny-gemma3", None),
            ("tiny-modernbert", 3), ("tiny-bart", 3), ("tiny-mbart", 3), ("tiny-deberta-v2", 3)]
IDS = ["bert", "vit", "dinov2", "t5", "llama-cls", "llama-lm", "opt-cls", "opt-lm", "distilbert", "gpt2-cls", "gpt2-lm",
       "phi3-cls", "phi3-lm", "neox-cls", "neox-lm", "clip-vision", "siglip-vision", "qwen3-cls", "qwen3-lm",
       "gemma2-cls", "gemma2-lm", "gemma3-cls", "gemma3-lm", "modernbert", "bart", "mbart", "deberta-v2"]
T5_BASE = dict(d_model=768, d_ff=3072, num_heads=12, d_kv=64, num_layers=12, vocab_size=32128)
T5_BASE_K = (1, 2, 3, 5, 6, 7, 9, 10, 11)



def wrap(name, num_labels=3, seed=0, **opts):
    torch.manual_seed(seed)
    return memtune.wrap(memtune.load_model(name), config_for("lst", opts), num_labels=num_labels)


def backbone_blocks(model):
    bb = model.backbone
    return list(bb.blocks) + (list(bb.decoder_blocks) if bb.is_encoder_decoder else [])


# -- config ------------------------------------------------------------------------------------------------
def test_registry_defaults_and_string_options():
    cfg = config_for("lst", {})
    assert isinstance(cfg, LSTConfig) and cfg.model_class is LSTModel
    assert (cfg.r, cfg.gate_temperature, cfg.keep_layers, cfg.init, cfg.fisher_samples, cfg.dropout) == \
        (8, 0.1, None, "magnitude", 1024, None)
    cfg = config_for("lst", {"r": "4", "keep_layers": "3,1,2", "init": "fisher", "gate_temperature": "0.5",
                             "fisher_samples": "16", "dropout": "0"})
    assert (cfg.r, cfg.keep_layers, cfg.init, cfg.gate_temperature, cfg.fisher_samples, cfg.dropout) == \
        (4, (1, 2, 3), "fisher", 0.5, 16, 0.0)
    assert config_for("lst", {"keep_layers": "none"}).keep_layers is None
    for bad in ({"r": 0}, {"init": "pruned"}, {"gate_temperature": 0}, {"keep_layers": "1,1"},
                {"keep_layers": "-1"}, {"dropout": 1.0}, {"fisher_samples": 0}, {"colour": 1}):
        with pytest.raises(ConfigError):
            config_for("lst", bad)
    with pytest.raises(ConfigError, match="do not exist"):
        wrap("tiny-bert", keep_layers=(1, 4))


@pytest.mark.parametrize("name,field", [("tiny-bert", "hidden_dropout_prob"), ("tiny-dinov2", "hidden_dropout_prob"),
                                        ("tiny-t5", "dropout_rate"), ("tiny-llama", None)])
def test_side_dropout_defaults_to_the_backbones_own(name, field):
    """dropout=None: the side path and side blocks drop as the backbone's blocks do (0 where it has none)."""
    model = wrap(name)
    own = float(getattr(model.backbone.config, field)) if field else 0.0
    assert model.output_stack.drop.p == own                         # ladders' W0 / W_up inputs
    if field:                                                       # the side blocks' residual dropout
        assert all(getattr(cfg, field) == own for cfg in model.side_configs.values())
    assert wrap(name, dropout=0.25).output_stack.drop.p == 0.25


# -- §13.1 / §13.2: no gradient and no graph in the backbone -------------------------------------------------
@pytest.mark.parametrize("name,num_labels", FAMILIES, ids=IDS)
def test_backbone_gets_no_grad_and_records_no_graph(name, num_labels):
    model = wrap(name, num_labels, keep_layers=(0, 2, 3))     # layer 1 dropped
    model.train()
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, o: outputs.append(o[0] if isinstance(o, tuple) else o))
             for b in backbone_blocks(model)]
    with count_saved_inside(backbone_blocks(model), model) as inside:
        loss = model(**batch_for(model)).loss
    for h in hooks:
        h.remove()
    loss.backward()
    assert inside.count == 0 and inside.bytes == 0
    assert outputs and all(o.grad_fn is None and not o.requires_grad for o in outputs)
    assert all(p.grad is None for p in model.backbone.parameters())
    for n, p in model.trainable_named_parameters():
        assert p.grad is not None, n
        if n.endswith("gates"):
            assert p.grad[1] == 0                                      # dropped layer's gate: unused
            assert all(p.grad[i] != 0 for i in (0, 2, 3))
        elif not (name == "tiny-t5" and ".decoder." in n and
                  any(x in n for x in ("SelfAttention.q", "SelfAttention.k", "relative_attention_bias"))):
            # (T5 classification reads the decoder's start position, which attends to itself only:
            # a one-element softmax gives its query, key and position bias no gradient.)
            assert p.grad.abs().sum() > 0, n


# -- §13.3: saved bytes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,num_labels", FAMILIES, ids=IDS)
def test_side_path_on_detached_taps_saves_the_same_bytes(name, num_labels):
    model = wrap(name, num_labels, keep_layers=(1, 2, 3))
    model.train()
    batch = batch_for(model)

    def end_to_end():
        model(**batch).loss.backward()

    taps, ctx = model.backbone_taps(batch)
    taps = {k: {i: t.detach() for i, t in v.items()} for k, v in taps.items()}

    def side_only():
        out = model.side_forward(taps, ctx)
        if model.objective == "causal-lm":
            logits = model.backbone.lm_logits(out)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                                     ignore_index=-100)
        else:
            loss = torch.nn.functional.cross_entropy(model.head(model.backbone.pool(out, ctx)), batch["labels"])
        loss.backward()

    e2e, side = saved_bytes(model, end_to_end), saved_bytes(model, side_only)
    assert side > 0 and abs(e2e - side) <= 0.01 * side


def test_saved_bytes_ratio_at_t5_base_encoder_shapes():
    """Encoder stack, T5-base shapes, T=128, fp32, eager, dropout 0.1, K of the paper (reference ≈ 0.26)."""
    torch.manual_seed(0)
    cfg = T5Config(**T5_BASE, dropout_rate=0.1)
    cfg._attn_implementation = "eager"
    with torch.device("meta"):
        t5 = T5Model(cfg)
    t5.to_empty(device="cpu")                       # the decoder is never run: only the encoder gets values
    with torch.no_grad():
        for n, p in t5.named_parameters():
            if not n.startswith("decoder."):
                p.normal_(0, 0.05) if p.dim() > 1 else p.fill_(1.0)
    model = memtune.wrap(t5, LSTConfig(keep_layers=T5_BASE_K, init="random"), num_labels=2).train()
    bb = model.backbone
    batch = bb.example_batch(1, 128)                # ratios are batch-independent to first order
    # Tensors are packed for backward during the forward pass, so the forward alone is counted.

    def lst():
        taps, ctx = model.encoder_taps(batch)
        model.side_encode(taps, ctx).sum()

    def encoder(trainable: bool):
        def run():
            for p in bb.model.encoder.parameters():
                p.requires_grad_(trainable)
            h, ctx = bb.embed(batch)
            if not trainable:                       # frozen backbone kept on the backprop path (PETL)
                h = h.detach().requires_grad_(True)
            for i in range(bb.num_layers):
                h = bb.run_block(i, h, ctx)
            bb.finish_encoder(h).sum()
        return run

    lst_b = saved_bytes(model, lst)
    petl_b = saved_bytes(model, encoder(False))
    full_b = saved_bytes(model, encoder(True))
    model.apply_trainable()                         # back to the declared trainable set
    assert lst_b / full_b <= 0.35                   # measured 0.258 (paper reference ≈ 0.26)
    assert lst_b < petl_b < full_b


# -- §13.4: parameter count ----------------------------------------------------------------------------------
def side_and_backbone_counts(cfg: T5Config, keep):
    with torch.device("meta"):
        t5 = T5Model(cfg)
    model = memtune.wrap(t5, LSTConfig(keep_layers=keep), num_labels=2)
    side = sum(p.numel() for n, p in model.trainable_named_parameters() if not n.startswith("head."))
    return model, side, sum(p.numel() for p in model.backbone.parameters())


def formula(d, d_ff, H, d_kv, N, K, r=8):
    ds, a, dfs = d // r, H * (d_kv // r), d_ff // r
    enc = K * (4 * ds * a + 2 * ds * dfs + 2 * ds) + 32 * H
    dec = K * (8 * ds * a + 2 * ds * dfs + 3 * ds) + 32 * H
    lad = (d * ds + ds) * (K + 1)
    return enc + dec + 2 * lad + 2 * N + 2 * ds + (ds * d + d)


def test_parameter_count_t5_base_and_3b():
    model, side, backbone = side_and_backbone_counts(T5Config(**T5_BASE), T5_BASE_K)
    assert side == formula(768, 3072, 12, 64, 12, 9) == 3_878_712
    assert backbone == 222_903_552
    assert round(100 * side / backbone, 2) == 1.74
    # Gates of dropped layers are allocated and counted: 2N in all.
    assert sum(s.gates.numel() for s in model.stacks.values()) == 2 * 12
    cfg_3b = T5Config(d_model=1024, d_ff=16384, num_heads=32, d_kv=128, num_layers=24, vocab_size=32128)
    _, side, backbone = side_and_backbone_counts(cfg_3b, (23,))
    assert side == formula(1024, 16384, 32, 128, 24, 1) == 2_494_896
    assert round(100 * side / backbone, 3) == 0.087


# -- §13.5: gates --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_gates_start_at_one_half_with_slope_quarter_over_temperature(temperature):
    stack = wrap("tiny-bert", gate_temperature=temperature).stacks["encoder"]
    mu = stack.mu(2)
    assert mu.item() == 0.5
    mu.backward()
    assert stack.gates.grad[2].item() == pytest.approx(0.25 / temperature, rel=1e-6)
    # The fusion is mu·s + (1 − mu)·ladder(h).
    s, h = torch.randn(2, 5, stack.ladders["embed"].out_features), torch.randn(2, 5, 64)
    torch.testing.assert_close(stack.fuse(2, s, h), 0.5 * s + 0.5 * stack.ladders["2"](h))


# -- §13.6: pruning init -------------------------------------------------------------------------------------
QKV = {"tiny-t5": ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v"),
       "tiny-bert": ("self.query", "self.key", "self.value"),
       "tiny-vit": ("q_proj", "k_proj", "v_proj"), "tiny-dinov2": ("q_proj", "k_proj", "v_proj")}


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-vit", "tiny-dinov2", "tiny-t5", "tiny-llama", "tiny-qwen3",
                                  "tiny-gemma2", "tiny-gemma3", "tiny-phi3", "tiny-gpt2", "tiny-gpt-neox",
                                  "tiny-siglip-vision", "tiny-modernbert"])   # CLIP: no final token norm
def test_pruning_copies_recorded_slices(name):
    model = wrap(name, keep_layers=(0, 2, 3))
    records = assert_pruning_records_hold(model)
    # Every side block parameter and every side final-norm parameter comes from the backbone.
    side_params = [n for n, _ in model.named_parameters()
                   if n.startswith("stacks.") and (".blocks." in n or ".norm." in n)]
    assert side_params and set(side_params) <= set(records)
    # q, k and v share rows, and their columns are the chain's current residual index set.
    if name in QKV:
        for side_name, (src, rows, cols) in records.items():
            if side_name.endswith(QKV[name][0] + ".weight"):
                for other in QKV[name][1:]:
                    _, r2, c2 = records[side_name.replace(QKV[name][0], other)]
                    assert torch.equal(rows, r2) and torch.equal(cols, c2)
    if name == "tiny-llama":        # grouped KV heads: the same within-head dims J, as rotary pairs
        blk = "stacks.decoder.blocks.0.self_attn"
        q_rows = records[f"{blk}.q_proj.weight"][1].view(4, -1)     # H=4 heads × d_kv'=2
        k_rows = records[f"{blk}.k_proj.weight"][1].view(2, -1)     # KV=2 heads
        J = q_rows[0]
        assert torch.equal(q_rows % 16, J.expand_as(q_rows)) and torch.equal(k_rows % 16, J.expand_as(k_rows))
        assert J[1] - J[0] == 8                                      # (j, j + d_kv/2)
    if name == "tiny-t5":
        # The chain: block 0 self-attention q reads the embedding's P, FFN wi reads o's rows, ...
        enc = "stacks.encoder.blocks.0.layer"
        _, p_rows, _ = records[f"{enc}.0.layer_norm.weight"]
        assert torch.equal(records[f"{enc}.0.SelfAttention.q.weight"][2], p_rows)
        o_rows = records[f"{enc}.0.SelfAttention.o.weight"][1]
        assert torch.equal(records[f"{enc}.1.layer_norm.weight"][1], o_rows)
        assert torch.equal(records[f"{enc}.1.DenseReluDense.wi.weight"][2], o_rows)
        # Cross-attention k/v columns follow the decoder chain (after self-attention o).
        dec = "stacks.decoder.blocks.0.layer"
        self_o = records[f"{dec}.0.SelfAttention.o.weight"][1]
        assert torch.equal(records[f"{dec}.1.EncDecAttention.k.weight"][2], self_o)
        # The relative-position table is copied unpruned from backbone block 0 into the first side block.
        table = "stacks.encoder.blocks.0.layer.0.SelfAttention.relative_attention_bias.weight"
        assert records[table] == ("backbone.model.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                  None, None)


def test_a_dominant_row_is_selected():
    lm = memtune.load_model("tiny-t5")
    blk = lm.model.encoder.block[1].layer
    with torch.no_grad():
        lm.model.shared.weight[:, 37] *= 100                           # a dominant embedding dim
        blk[1].DenseReluDense.wi.weight[101] *= 100                    # a dominant FFN row
        for x in (blk[0].SelfAttention.q, blk[0].SelfAttention.k, blk[0].SelfAttention.v):
            x.weight[13] *= 10                                         # a dominant q/k/v row (product score)
    model = memtune.wrap(lm, LSTConfig(), num_labels=2)
    rec = model.pruning_records
    assert 37 in rec["stacks.encoder.blocks.0.layer.0.SelfAttention.q.weight"][2]
    assert 101 in rec["stacks.encoder.blocks.1.layer.1.DenseReluDense.wi.weight"][1]
    assert 13 in rec["stacks.encoder.blocks.1.layer.0.SelfAttention.k.weight"][1]
    # The side copy of that row is the largest row of the side wi.
    wi_rows = rec["stacks.encoder.blocks.1.layer.1.DenseReluDense.wi.weight"][1]
    side_wi = model.stacks["encoder"].block(1).layer[1].DenseReluDense.wi.weight
    assert wi_rows[side_wi.abs().sum(1).argmax()] == 101


def test_magnitude_and_fisher_differ_only_in_importance(monkeypatch):
    magnitude = wrap("tiny-t5", init="magnitude")
    # Fisher with I := |θ| must give exactly the magnitude initialisation.
    monkeypatch.setattr(lst_model_module, "fisher_importance",
                        lambda model, batches, n: ({f"backbone.{k}": p.detach().abs()
                                                    for k, p in model.backbone.named_parameters()}, n))
    fisher = wrap("tiny-t5", init="fisher")
    with torch.no_grad():                                             # start from something else
        for n, p in fisher.named_parameters():
            if ".blocks." in n:
                p.normal_()
    fisher.initialize_from_fisher([], samples=4)
    for (n, a), (_, b) in zip(magnitude.named_parameters(), fisher.named_parameters()):
        assert torch.equal(a, b), n
    assert not fisher.data_init_pending


@pytest.mark.parametrize("name,num_labels", [("tiny-bert", 3), ("tiny-t5", 3), ("tiny-llama", None)],
                         ids=["bert", "t5", "llama-lm"])
def test_fisher_runs_exactly_samples_backward_passes_and_leaves_backbone(name, num_labels):
    model = wrap(name, num_labels, init="fisher")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    side_before = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    sizes, backward = [], []

    def on_forward(_m, args, out):
        out = out[0] if isinstance(out, tuple) else out
        sizes.append(out.shape[0])
        out.register_hook(lambda g: backward.append(1))

    hook = model.backbone.blocks[0].register_forward_hook(on_forward)
    batches = [batch_for(model, b=2, seed=s) for s in range(3)]       # 6 examples available
    used = model.initialize_from_fisher(batches, samples=3)           # stops inside the second batch
    hook.remove()
    assert used == 3 and len(backward) == 3 and sizes == [1] * 3
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is None for p in model.parameters())
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, side_before[n])]
    assert changed and all(".blocks." in n or ".norm." in n for n in changed)   # only pruned parts move
    assert not model.data_init_pending


# -- §13.7: encoder-decoder ----------------------------------------------------------------------------------
def test_side_cross_attention_reads_s_enc():
    model = wrap("tiny-t5", keep_layers=(1, 3)).train()
    seen, produced = [], []
    original = model.side_encode

    def side_encode(*a, **k):
        produced.append(original(*a, **k))
        return produced[-1]

    model.side_encode = side_encode
    hooks = [getattr(model.stacks["decoder"].block(i).layer[1].EncDecAttention, x).register_forward_pre_hook(
        lambda m, args: seen.append(args[0])) for i in (1, 3) for x in "kv"]
    batch = batch_for(model)
    batch["decoder_input_ids"] = torch.randint(5, 60, (3, 4))
    model(**batch).loss.backward()
    for h in hooks:
        h.remove()
    d_side = model.side_configs["decoder"].d_model
    assert len(seen) == 4 and all(x is produced[0] for x in seen)
    assert produced[0].shape == (3, 9, d_side) and d_side == 64 // 8


def randomized_t5(keep):
    return randomize_side(wrap("tiny-t5", keep_layers=keep))


def source_batch(seed=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (4, 8), generator=g)
    mask = (torch.arange(8)[None] < torch.tensor([8, 5, 7, 3])[:, None]).long()
    return ids * mask, mask


def test_greedy_generate_equals_greedy_of_teacher_forced_logits():
    model = randomized_t5((1, 2))
    ids, mask = source_batch()
    out = model.generate(ids, mask, max_new_tokens=6, stop_at_eos=False)
    assert out.shape == (4, 7) and (out[:, 0] == 0).all()
    with torch.no_grad():
        taps, ctx = model.backbone_taps({"input_ids": ids, "attention_mask": mask, "decoder_input_ids": out[:, :-1]})
        logits = model.lm_logits(model.side_forward(taps, ctx))     # B×6×V
    assert torch.equal(logits.argmax(-1), out[:, 1:])
    assert len(set(out[:, 1:].flatten().tolist())) > 2                # not a constant sequence


def test_beam_search_is_batch_order_independent_with_dropped_layers():
    model = randomized_t5((1, 2))
    ids, mask = source_batch()
    beams = model.generate(ids, mask, max_new_tokens=5, num_beams=3)
    perm = torch.tensor([2, 0, 3, 1])
    permuted = model.generate(ids[perm], mask[perm], max_new_tokens=5, num_beams=3)
    assert torch.equal(permuted, beams[perm])
    single = torch.cat([model.generate(ids[i:i + 1], mask[i:i + 1], max_new_tokens=5, num_beams=3)
                        for i in range(4)])
    assert torch.equal(single, beams)


# -- §13.8: layer dropping -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-bert", "tiny-vit", "tiny-t5", "tiny-llama"])
def test_dropping_a_layer_removes_one_ladder_and_one_side_block_per_stack(name):
    full = wrap(name, keep_layers=(0, 1, 2, 3))
    for i in range(4):
        kept = tuple(j for j in range(4) if j != i)
        dropped = wrap(name, keep_layers=kept)
        assert set(full.stacks) == set(dropped.stacks)
        for key in full.stacks:
            a, b = full.stacks[key], dropped.stacks[key]
            assert set(a.ladders) - set(b.ladders) == {str(i)} and set(b.ladders) < set(a.ladders)
            assert set(a.blocks) - set(b.blocks) == {str(i)} and set(b.blocks) < set(a.blocks)
            assert a.gates.numel() == b.gates.numel() == 4
        if name == "tiny-t5" and i == 0:
            continue   # block 0 holds the relative-position table, which moves to the next kept block
        # The parameter difference is exactly one ladder and one side block in each stack.
        removed = sum(sum(p.numel() for p in s.ladders[str(i)].parameters()) +
                      sum(p.numel() for p in s.block(i).parameters()) for s in full.stacks.values())
        assert full.num_parameters_split()[0] - dropped.num_parameters_split()[0] == removed


# -- behaviour -----------------------------------------------------------------------------------------------
def test_widths_follow_the_reduction_factor():
    t5 = wrap("tiny-t5")
    enc = t5.side_configs["encoder"]
    assert (enc.d_model, enc.d_ff, enc.d_kv, enc.num_heads, enc.dropout_rate) == (8, 16, 2, 4, 0.1)
    assert t5.side_configs["decoder"].is_decoder and not enc.is_decoder
    llama = wrap("tiny-llama", None, r=4)
    c = llama.side_configs["decoder"]
    assert (c.hidden_size, c.intermediate_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads) == \
        (16, 32, 4, 4, 2)
    bert = wrap("tiny-bert", r=3)     # 64/3 is not a multiple of H=4: the nearest width H divides
    assert bert.side_configs["encoder"].hidden_size == 4 * round(16 / 3)
    # Fused side attention by default where the family has it (T5: eager), with its probability dropout 0.
    assert all(c._attn_implementation == "eager" and c.dropout_rate == 0.1 for c in t5.side_configs.values())
    assert llama.side_configs["decoder"]._attn_implementation == "sdpa"
    assert llama.side_configs["decoder"].attention_dropout == 0.0
    cb = bert.side_configs["encoder"]
    assert (cb._attn_implementation, cb.attention_probs_dropout_prob, cb.hidden_dropout_prob) == ("sdpa", 0.0, 0.1)
    eager = wrap("tiny-bert", attention="eager").side_configs["encoder"]
    assert (eager._attn_implementation, eager.attention_probs_dropout_prob) == ("eager", 0.1)


def test_llama_causal_lm_uses_the_frozen_lm_head_and_is_causal():
    model = wrap("tiny-llama", None, dropout=0.0).eval()
    batch = batch_for(model)
    out = model(**batch)
    assert out.logits.shape == (3, 9, model.backbone.config.vocab_size)
    assert not model.backbone.model.lm_head.weight.requires_grad
    with torch.no_grad():                                   # changing a later token leaves earlier logits alone
        model.up.weight.normal_()
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][:, 6] = 7
        a, b = model(**batch).logits, model(**changed).logits
    torch.testing.assert_close(a[1:, :6], b[1:, :6])
    assert not torch.allclose(a[1:, 6:], b[1:, 6:])


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-t5"])
def test_training_reduces_loss_and_checkpoint_round_trips(name, tmp_path):
    model = wrap(name, 2, dropout=0.0)
    batch = batch_for(model, b=4)
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    model.train()
    first, last = fit_fixed_batch(model, batch, lr=3e-3, steps=25)
    assert last < 0.5 * first
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = memtune.load(name, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def other_architectures():
    from transformers import (Dinov2Config, Dinov2Model, MistralConfig, MistralForCausalLM, MPNetConfig, MPNetModel,
                              Qwen2Config, Qwen2ForCausalLM, RobertaConfig, RobertaModel)
    small = dict(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128)
    return {
        "mpnet": lambda: MPNetModel(MPNetConfig(**small)),
        "roberta": lambda: RobertaModel(RobertaConfig(**small)),
        "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**small, num_key_value_heads=2)),
        "mistral": lambda: MistralForCausalLM(MistralConfig(**small, num_key_value_heads=1, head_dim=32)),
        "t5-gated": lambda: T5Model(T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_heads=4,
                                             feed_forward_proj="gated-gelu", decoder_start_token_id=0)),
        "dinov2-swiglu": lambda: Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=64,
                                                          num_hidden_layers=3, num_attention_heads=4,
                                                          use_swiglu_ffn=True)),
    }


@pytest.mark.parametrize("arch", list(other_architectures()))
def test_other_architectures_of_each_family(arch):
    torch.manual_seed(0)
    hf = other_architectures()[arch]()
    hf.config._attn_implementation = "eager"
    model = memtune.wrap(hf, LSTConfig(keep_layers=(0, 2)), num_labels=2).train()
    for side_name, (src, rows, cols) in model.pruning_records.items():
        w = model.get_parameter(src)
        w = w[rows] if rows is not None else w
        assert torch.equal(model.get_parameter(side_name), w[:, cols] if cols is not None else w)
    batch = model.backbone.example_batch(2, 8)
    if "input_ids" in batch:
        batch["input_ids"] = batch["input_ids"] % 100
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for _, p in model.trainable_named_parameters())


def test_fused_side_attention_saves_less_and_computes_the_same():
    """`attention="sdpa"` stores no B·H·T² maps for backward; with dropout off it is the same function."""
    import memtune
    from memtune.memory.saved import saved_bytes
    from memtune.models import load_model

    out, saved = {}, {}
    for attention in ("eager", "sdpa"):
        torch.manual_seed(0)
        model = memtune.wrap(load_model("tiny-bert"), memtune.config_for("lst", {"attention": attention,
                                                                                 "dropout": 0.0}), num_labels=2)
        model.eval()
        batch = model.backbone.example_batch(2, 64)
        batch["labels"] = torch.tensor([0, 1])
        out[attention] = model(**batch).logits
        saved[attention] = saved_bytes(model, lambda: model(**batch).loss)
    torch.testing.assert_close(out["sdpa"], out["eager"], rtol=1e-4, atol=1e-5)
    assert saved["sdpa"] < saved["eager"]


@pytest.mark.parametrize("name, num_labels", [("tiny-bert", 3), ("tiny-vit", 3), ("tiny-llama", None)])
def test_fused_side_attention_gradients_equal_eager_and_no_maps_are_saved(name, num_labels):
    """Side dropout off, fp32: the fused kernel gives the eager path's gradients, and its side blocks save no
    T×T tensor. Tolerance: the flash kernel sums the softmax and P·V over keys in blocks with an online
    max (another order than eager's), ≤ T·2⁻²⁴ ≈ 1e-6 relative per attention for T ≤ 17; through ≤ 4 side
    blocks, forward and backward, well below the asserted 1e-4 relative (atol 1e-5 × the largest gradient
    entry of the model, for entries that cancel to about zero)."""
    grads, maps = {}, {}
    for attention in ("eager", "sdpa"):
        model = wrap(name, num_labels, attention=attention, dropout=0.0).train()
        batch = batch_for(model)
        if "attention_mask" in batch:                      # no padding: no T×T mask tensor either
            batch["attention_mask"].fill_(1)
            batch["input_ids"].clamp_(min=5)
            if model.objective == "causal-lm":
                batch["labels"] = batch["input_ids"].clone()
        T = (batch["input_ids"] if "input_ids" in batch else model.backbone.embed(batch)[0]).shape[1]
        shapes = []
        blocks = list(model.output_stack.blocks.values())
        with count_saved_inside(blocks, model):            # hooks toggle; record shapes via our own pack
            def pack(t):
                shapes.append(tuple(t.shape))
                return t
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(**batch).loss
        loss.backward()
        maps[attention] = [s for s in shapes if len(s) >= 2 and s[-2:] == (T, T)]
        grads[attention] = {n: p.grad.clone() for n, p in model.trainable_named_parameters()}
    assert maps["eager"] and not maps["sdpa"], maps["sdpa"]
    scale = max(g.abs().max().item() for g in grads["eager"].values())   # entries that cancel to ~0 need an atol
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["sdpa"][n], g, rtol=1e-4, atol=1e-5 * scale)


def test_side_heads_sets_the_side_head_count():
    bert = wrap("tiny-bert", r=2, side_heads=2)            # d' = 32: 2 heads of 16 instead of 4 of 8
    c = bert.side_configs["encoder"]
    assert (c.num_attention_heads, c.hidden_size) == (2, 32)
    vit = wrap("tiny-vit", r=2, side_heads=1)
    c = vit.side_configs["encoder"]
    assert (c.num_attention_heads, c.head_dim, c.hidden_size) == (1, 32, 32)
    for model in (bert, vit):
        batch = batch_for(model)
        model(**batch).loss.backward()
        assert all(p.grad is None for p in model.backbone.parameters())
    assert wrap("tiny-bert").side_configs["encoder"].num_attention_heads == 4     # default: the backbone's H
    with pytest.raises(ConfigError, match="side_heads=2: another head count"):
        wrap("tiny-t5", side_heads=2)
    with pytest.raises(ConfigError, match="lst.side_heads=2: on llama backbones only QST's side blocks"):
        wrap("tiny-llama", side_heads=2)                  # its pruned init maps heads one to one
    with pytest.raises(ConfigError, match="lst.side_heads must be a positive head count"):
        config_for("lst", {"side_heads": 0})


def test_w0_reads_the_embedding_with_one_dropout_draw():
    # BERT's embeddings apply their dropout (0.1) inside: a training-mode trunk has drawn it, so W0 adds none;
    # an eval-mode trunk (trunk_dropout=false) gets the side's own draw.
    batch = batch_for(wrap("tiny-bert"))
    batch.pop("labels")
    for trunk_dropout, side_draws in ((True, False), (False, True)):
        model = wrap("tiny-bert", trunk_dropout=trunk_dropout).train()
        stack = model.stacks[model._output_name]
        calls = []
        original = stack.drop.forward
        stack.drop.forward = lambda x: calls.append(x.shape) or original(x)
        torch.manual_seed(0)
        taps, ctx = model.backbone_taps(batch)
        model.side_forward(taps, ctx)
        e_shape = (batch["input_ids"].shape[0], batch["input_ids"].shape[1], model.backbone.hidden_size)
        assert (e_shape in calls) is side_draws, (trunk_dropout, calls)
        assert ctx["embed_dropped"] is (not side_draws)

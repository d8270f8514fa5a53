"""DTL / DTL+ (Compact Side Network): the checks of docs/methods/dtl.md §11 on tiny models, counts and byte ratios at ViT-B shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memtune
from memtune.memory.saved import count_saved_inside, saved_bytes
from memtune.methods import ConfigError, config_for
from memtune.methods.dtl import DTLConfig, DTLPlusConfig, TrunkCacheError, default_add_blocks, swish

from .side_helpers import train_epochs



def wrap(name, method="dtl", num_labels=3, seed=0, **opts):
    torch.manual_seed(seed)
    return memtune.wrap(memtune.load_model(name), config_for(method, opts), num_labels=num_labels)


def text_batch(b=3, lengths=(9, 5, 7), t=None, seed=1, vocab=60):
    g = torch.Generator().manual_seed(seed)
    t = t or max(lengths)
    ids = torch.randint(5, vocab, (b, 32), generator=g)[:, :t]     # same tokens whatever the padded length
    mask = (torch.arange(t)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.arange(b) % 3}


def image_batch(b=2, h=32, w=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(b, 3, h, w, generator=g), "labels": torch.arange(b) % 3}


def batch_for(name, **kw):
    return text_batch(**kw) if name == "tiny-bert" else image_batch(**kw)


def randomize_side(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def reference_logits(model, batch):
    """The frozen backbone with the same pooling and head, block by block through the protocol."""
    bb = model.backbone
    with torch.no_grad():
        h, ctx = bb.embed(batch)
        for i in range(bb.num_layers):
            h = bb.run_block(i, h, ctx)
        if bb.family == "vit" and model.method_config.readout == "patch-mean":
            rows, cols = ctx["grid"]
            feats = bb.model.layernorm(h[:, h.shape[1] - rows * cols:].mean(1))   # pool, then final LN
        else:
            feats = bb.pool(bb.finish(h, ctx), ctx)
        return model.head(feats)


# -- config --------------------------------------------------------------------------------------------
def test_registry_and_defaults():
    assert memtune.METHODS["dtl"] is DTLConfig and memtune.METHODS["dtl+"] is DTLPlusConfig
    assert DTLConfig().fusion is None and DTLPlusConfig().fusion == "dwconv"
    c = config_for("dtl+", {"rank": "4", "add_blocks": "2,3", "kernel": "5", "fusion": "dwconv", "beta": "50"})
    assert (c.rank, c.add_blocks, c.kernel, c.beta) == (4, (2, 3), 5, 50.0)
    assert config_for("dtl+", {"fusion": "none"}).fusion is None
    assert default_add_blocks(12) == tuple(range(6, 12))      # ViT-B: reference code's S
    assert default_add_blocks(6) == (2, 3, 4, 5)               # MiniLM
    assert default_add_blocks(4) == (1, 2, 3)
    assert default_add_blocks(1) == (0,)
    m = wrap("tiny-vit")
    assert (m.s0, m.read_blocks, m.add_blocks) == (1, (0, 1, 2, 3), (1, 2, 3))
    assert m.feature_size == 64 and m.head.in_features == 64   # mean of patch tokens, not [CLS ‖ mean]
    assert wrap("tiny-vit", add_blocks=(2,)).read_blocks == (0, 1, 2)   # reads default up to the last add-back


@pytest.mark.parametrize("opts, fragment", [
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"fusion": "conv3d"}, "fusion must be none (DTL) or one of dwconv"),
    ({"kernel": 0}, "kernel (depthwise conv size) must be an integer >= 1, got 0"),
    ({"beta": 0}, "beta must be a finite number > 0"),
    ({"add_blocks": (-1, 3)}, "add_blocks must be block indices >= 0"),
    ({"read_blocks": (1, 1)}, "read_blocks repeats a block index"),
    ({"add_blocks": ()}, "add_blocks must list at least one block"),
    ({"cache_trunk": True, "trunk_dropout": True}, "cannot be combined with trunk_dropout"),
    ({"cache_dir": "x"}, "only used with cache_trunk=true"),
    ({"cache_trunk": True, "cache_dtype": "fp8"}, "cache_dtype must be one of full, bf16"),
    ({"cache_trunk": True, "cache_verify": "maybe"}, "cache_verify must be one of warn, strict"),
    ({"tap_storage": "int4"}, "tap_storage must be one of full, bf16, int8"),
    ({"cache_max_bytes": 0}, "cache_max_bytes must be a positive number of bytes"),
    ({"rank": "two"}, "expected int"),
])
def test_bad_config_values(opts, fragment):
    with pytest.raises(ConfigError) as e:
        config_for("dtl", opts)
    assert fragment in str(e.value)


@pytest.mark.parametrize("opts, fragment", [
    ({"add_blocks": (2, 4)}, "add_blocks: block(s) [4] out of range for this 4-block model (allowed: 0..3)"),
    ({"read_blocks": (0, 7)}, "read_blocks: block(s) [7] out of range"),
    ({"read_blocks": (2, 3), "add_blocks": (1, 3)}, "comes before the first read block"),
    ({"read_blocks": (0, 3), "add_blocks": (1, 2)}, "come after the last add-back (2)"),
])
def test_bad_block_sets_for_the_model(opts, fragment):
    with pytest.raises(ConfigError) as e:
        wrap("tiny-vit", **opts)
    assert fragment in str(e.value)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-llama"])
def test_refuses_other_families(name):
    with pytest.raises(ConfigError, match="supported families: bert, vit"):
        memtune.wrap(memtune.load_model(name), "dtl", num_labels=2)


# -- parameter counts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method, kernel, expected", [
    ("dtl", 3, 36_864), ("dtl+", 3, 43_776), ("dtl+", 4, 49_152), ("dtl+", 5, 56_064)])
def test_parameter_count_vit_b(method, kernel, expected):
    from transformers import ViTConfig, ViTModel

    with torch.device("meta"):
        m = memtune.wrap(ViTModel(ViTConfig()), config_for(method, {"rank": 2, "kernel": kernel}), num_labels=10)
    side = sum(p.numel() for n, p in m.trainable_named_parameters() if not n.startswith("head."))
    assert side == expected                      # 2·D·r·|L| (+ D·k² for DTL+), D=768, r=2, |L|=12
    assert len(list(m.inject.parameters())) == (1 if method == "dtl+" else 0)   # one shared conv
    assert all(not p.requires_grad for p in m.backbone.parameters())


def test_parameter_count_bert():
    m = wrap("tiny-bert", "dtl+", rank=3, kernel=4)
    side = sum(p.numel() for n, p in m.trainable_named_parameters() if not n.startswith("head."))
    assert side == 2 * 64 * 3 * len(m.read_blocks) + 64 * 4    # Conv1d over tokens: D·k
    assert m.no_weight_decay() == {"head.bias"}


# -- starting point ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dtl", "dtl+"])
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-dinov2", "tiny-bert", "tiny-swin"])
def test_output_at_init_equals_backbone(name, method):
    m = wrap(name, method, kernel=4).eval()
    batch = batch_for(name)
    with torch.no_grad():
        logits = m(**batch).logits
    ref = reference_logits(m, batch)
    assert (logits - ref).abs().max().item() <= 1e-6
    randomize_side(m)                            # the comparison can fail: a trained side network differs
    with torch.no_grad():
        assert (m(**batch).logits - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-dinov2"])
def test_backbone_readout_is_the_linear_probes_features(name):
    """readout=backbone: the head reads [CLS ‖ mean] (2D) as the linear probe does, and the start is still the
    backbone's output through that read-out."""
    m = wrap(name, "dtl", readout="backbone").eval()
    probe = memtune.wrap(memtune.load_model(name), "linear", num_labels=3).eval()
    assert m.feature_size == probe.feature_size == 2 * m.backbone.hidden_size
    batch = batch_for(name)
    with torch.no_grad():
        assert torch.allclose(m.features(batch), probe.features(batch), atol=1e-6)
        assert (m(**batch).logits - reference_logits(m, batch)).abs().max().item() <= 1e-6
    with pytest.raises(ConfigError, match="readout"):
        config_for("dtl", {"readout": "cls"})


# -- gradients -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dtl", "dtl+"])
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-bert", "tiny-swin"])
def test_gradients_at_step_zero(name, method):
    m = wrap(name, method)
    m(**batch_for(name)).loss.backward()
    assert all(p.grad is None for p in m.backbone.parameters())
    for i in m.read_blocks:                      # every read block is ≤ max S
        read = m.reads[str(i)]
        assert torch.count_nonzero(read.down.weight.grad) == 0, f"∂L/∂A_{i} must be exactly 0 (B_{i} = 0)"
        assert read.up.weight.grad.abs().sum() > 0, f"∂L/∂B_{i} must be non-zero (θ'(0) = 0.5)"
    assert m.head.weight.grad.abs().sum() > 0


# -- disentanglement -----------------------------------------------------------------------------------
def hidden_of(out):
    """A block's output states (HF's SwinLayer returns (states, attention weights))."""
    return out[0] if isinstance(out, tuple) else out


def block_outputs(model, run):
    outs = {}
    hooks = [b.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, hidden_of(o).detach().clone()))
             for i, b in enumerate(model.backbone.blocks)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return outs


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-bert", "tiny-swin"])
def test_trunk_is_pretrained_exact_and_later_blocks_differ(name):
    m = wrap(name, "dtl+")
    randomize_side(m)
    batch = batch_for(name, seed=3)
    real = batch["attention_mask"].bool() if "attention_mask" in batch else slice(None)   # images: every row
    bb = m.backbone
    ref = block_outputs(m, lambda: bb.eval()(batch))
    m.train()                                    # the trunk runs in eval mode even while training
    got = block_outputs(m, lambda: m(**batch))
    for i in range(m.s0 + 1):                    # outputs before the injection after s0: bit-identical
        assert torch.equal(got[i][real], ref[i][real]), f"block {i} is not pretrained-exact"
    for i in range(m.s0 + 1, bb.num_layers):
        assert not torch.allclose(got[i][real], ref[i][real], atol=1e-4), f"block {i} should see injections"


def test_trunk_dropout_option_runs_trunk_in_train_mode():
    m = wrap("tiny-bert", "dtl", trunk_dropout=True).train()
    batch = text_batch()
    ref = block_outputs(m, lambda: m.backbone.eval()(batch))
    m.train()
    got = block_outputs(m, lambda: m(**batch))
    assert not torch.equal(got[0], ref[0])       # BERT dropout 0.1 now active in block 0


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-bert", "tiny-swin"])
def test_frozen_trunk_records_nothing(name):
    m = wrap(name, "dtl+").train()
    bb = m.backbone
    trunk = [bb.model.embeddings, *list(bb.blocks)[: m.s0 + 1]]
    later = list(bb.blocks)[m.s0 + 1:]
    batch = batch_for(name)
    with count_saved_inside(trunk, m) as inside:
        loss = m(**batch).loss
    assert inside.count == 0
    with count_saved_inside(later, m) as after:
        m(**batch).loss
    assert after.count > 0 and after.bytes > 0   # the same probe sees the blocks on the backprop path
    outs = {}
    hooks = [b.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, hidden_of(o)))
             for i, b in enumerate(bb.blocks)]
    m(**batch)
    for h in hooks:
        h.remove()
    assert all(outs[i].grad_fn is None for i in range(m.s0 + 1))
    assert all(outs[i].grad_fn is not None for i in range(m.s0 + 1, bb.num_layers))
    loss.backward()


# -- accumulation, swish, fusion -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-vit", "tiny-bert"])
def test_single_add_back_injects_swish_of_accumulated_reads(name):
    j = 2
    m = wrap(name, "dtl", add_blocks=(j,)).eval()
    randomize_side(m)
    batch = batch_for(name)
    got = []
    hook = m.inject.register_forward_hook(lambda mod, a, o: got.append(o))
    with torch.no_grad():
        m(**batch)
    hook.remove()
    assert len(got) == 1
    inputs = {}
    bb = m.backbone
    pre = [b.register_forward_pre_hook(lambda mod, a, i=i: inputs.__setitem__(i, a[0]))
           for i, b in enumerate(bb.blocks)]
    with torch.no_grad():
        bb(batch)
    for h in pre:
        h.remove()
    keep = batch["attention_mask"].float()[..., None] if "attention_mask" in batch else 1.0
    h = sum((inputs[i] * keep) @ m.reads[str(i)].down.weight.T @ m.reads[str(i)].up.weight.T for i in range(j + 1))
    expect = h * torch.sigmoid(100 * h)
    assert torch.allclose(got[0], expect, atol=1e-6, rtol=1e-5)


def test_swish():
    u = torch.linspace(-0.2, 0.2, 101, dtype=torch.float64, requires_grad=True)
    assert torch.equal(swish(u, 100), u * torch.sigmoid(100 * u))
    zero = torch.zeros(1, requires_grad=True)
    swish(zero, 100).backward()
    assert zero.grad.item() == 0.5
    assert torch.autograd.gradcheck(lambda x: swish(x, 100.0), (u,))
    assert torch.allclose(swish(torch.tensor([-1.0, 1.0]), 1e4), torch.tensor([0.0, 1.0]))   # → ReLU


@pytest.mark.parametrize("kernel", [3, 4, 5])
def test_dtl_plus_vit_fusion(kernel):
    m = wrap("tiny-vit", "dtl+", kernel=kernel).eval()
    randomize_side(m)
    convs = [n for n, p in m.named_parameters() if p.requires_grad and p.dim() == 4]
    assert convs == ["inject.conv.weight"]
    seen = []
    hook = m.inject.register_forward_hook(lambda mod, a, o: seen.append((a[0], o)))
    with torch.no_grad():
        m(**image_batch())
    hook.remove()
    assert len(seen) == len(m.add_blocks)
    h, out = seen[0]
    u = h * torch.sigmoid(100 * h)
    assert torch.equal(out[:, 0], u[:, 0])        # CLS row passes through
    grid = u[:, 1:].transpose(1, 2).reshape(2, 64, 4, 4)
    # 'same' as PyTorch: (k−1)//2 before, the rest (one more for even k) after; keeps the 4×4 shape.
    expect = F.conv2d(F.pad(grid, ((kernel - 1) // 2, kernel // 2) * 2), m.inject.conv.weight, groups=64)
    expect = expect.flatten(2).transpose(1, 2)
    assert torch.allclose(out[:, 1:], expect, atol=1e-6)


def test_even_kernel_same_padding_at_vit_b_grid():
    from memtune.methods.dtl import Injection

    inj = Injection(8, 100.0, "dwconv", 4, "grid")
    h = torch.randn(2, 1 + 14 * 14, 8)
    out = inj(h, {"grid": (14, 14)})
    assert out.shape == h.shape                   # 14×14 preserved with k = 4
    u = swish(h, 100.0)
    grid = u[:, 1:].transpose(1, 2).reshape(2, 8, 14, 14)
    manual = F.conv2d(F.pad(grid, (1, 2, 1, 2)), inj.conv.weight, groups=8)   # left/top 1, right/bottom 2
    assert torch.allclose(out[:, 1:], manual.flatten(2).transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("name, size", [("tiny-vit", (48, 32)), ("tiny-dinov2", (40, 56))])
def test_grid_follows_input_size(name, size):
    m = wrap(name, "dtl+", kernel=4).eval()
    batch = image_batch(h=size[0], w=size[1])
    with torch.no_grad():
        assert (m(**batch).logits - reference_logits(m, batch)).abs().max() <= 1e-6
    randomize_side(m)
    shapes = []
    hook = m.inject.conv.register_forward_hook(lambda mod, a, o: shapes.append((a[0].shape, o.shape)))
    with torch.no_grad():
        m(**batch)
    hook.remove()
    rows, cols = size[0] // 8, size[1] // 8
    k = 3                                          # k = 4: input padded by 3 in each direction
    assert shapes[0] == (torch.Size([2, 64, rows + k, cols + k]), torch.Size([2, 64, rows, cols]))


def test_bert_dwconv_ignores_padding_length():
    m = wrap("tiny-bert", "dtl+", kernel=4).eval()
    randomize_side(m)
    short = text_batch(lengths=(9, 5, 7))
    long = text_batch(lengths=(9, 5, 7), t=16)
    with torch.no_grad():
        a, b = m(**short).logits, m(**long).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_save_and_load_roundtrip(tmp_path):
    m = wrap("tiny-vit", "dtl+", kernel=5, rank=3).eval()
    randomize_side(m)
    m.save_pretrained(tmp_path)
    back = memtune.load("tiny-vit", tmp_path).eval()
    batch = image_batch()
    with torch.no_grad():
        assert torch.equal(m(**batch).logits, back(**batch).logits)


# -- Swin: a new side state per stage (docs/methods/dtl.md §6, §11.7) -------------------------------------------
def swin_b_config():
    from transformers import SwinConfig

    return SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=7, patch_size=4)


def test_swin_defaults_follow_the_stages():
    m = wrap("tiny-swin")                      # stages: blocks 0..1 at width 16, blocks 2..3 at width 32
    assert (m.s0, m.read_blocks, m.add_blocks) == (1, (0, 1, 2, 3), (1, 2, 3))
    assert [tuple(m.reads[str(i)].up.weight.shape) for i in m.read_blocks] == [(16, 2), (16, 2), (32, 2), (32, 2)]
    assert set(m.stage_inject) == {"0", "1"} and not hasattr(m, "inject")
    assert m.feature_size == 32 and m.head.in_features == 32         # the last stage's width
    late = wrap("tiny-swin", add_blocks=(3,))
    assert late.read_blocks == (2, 3) and set(late.stage_inject) == {"1"}   # reads start at the stage's start


@pytest.mark.parametrize("method, kernel, expected", [("dtl", 5, 90_112), ("dtl+", 5, 90_112 + 38_400)])
@pytest.mark.parametrize("add", [tuple(range(14, 24)), None])        # the reference's S, and the default 13..23
def test_parameter_count_swin_b(method, kernel, expected, add):
    from transformers import SwinModel

    with torch.device("meta"):
        m = memtune.wrap(SwinModel(swin_b_config()), config_for(method, {"rank": 4, "kernel": kernel,
                                                                          "add_blocks": add}), num_labels=10)
    assert m.read_blocks == tuple(range(4, 24))                       # taps 4..23: stages 0-1 have no side network
    side = sum(p.numel() for n, p in m.trainable_named_parameters() if not n.startswith("head."))
    assert side == expected          # 2·r·(18·512 + 2·1024); DTL+: one k×k conv per stage with add-backs (512, 1024)
    convs = [n for n, p in m.named_parameters() if p.requires_grad and p.dim() == 4]
    assert convs == (["stage_inject.2.conv.weight", "stage_inject.3.conv.weight"] if method == "dtl+" else [])


@pytest.mark.parametrize("method", ["dtl", "dtl+"])
def test_swin_state_restarts_at_each_stage(method):
    m = wrap("tiny-swin", method, kernel=3).eval()
    randomize_side(m)
    with torch.no_grad():
        for i in (2, 3):                                              # stage 1: B_i = 0
            m.reads[str(i)].up.weight.zero_()
    seen = {k: [] for k in ("0", "1")}
    hooks = [m.stage_inject[k].register_forward_hook(lambda mod, a, o, k=k: seen[k].append(o)) for k in seen]
    with torch.no_grad():
        m(**image_batch())
    for h in hooks:
        h.remove()
    assert len(seen["0"]) == 1 and len(seen["1"]) == 2
    assert seen["0"][0].abs().max() > 0                               # stage 0 injects
    assert all(torch.count_nonzero(o) == 0 for o in seen["1"])       # stage 0's state never reaches stage 1


def test_swin_add_back_lands_before_the_patch_merging():
    m = wrap("tiny-swin", "dtl+", add_blocks=(1,), kernel=3).eval()  # reads 0, 1; block 1 ends stage 0
    randomize_side(m)
    batch = image_batch()
    bb = m.backbone
    with torch.no_grad():
        x0, ctx = bb.embed(batch)
        x1 = bb.run_block(0, x0, ctx)
        y = bb.run_block_in_stage(1, x1, ctx)                         # B×256×16, before the merge
        h = sum(x @ m.reads[str(i)].down.weight.T @ m.reads[str(i)].up.weight.T for i, x in ((0, x0), (1, x1)))
        u = h * torch.sigmoid(100 * h)
        grid = u.transpose(1, 2).reshape(2, 16, 16, 16)               # no [CLS]: the whole 16×16 map
        g = F.conv2d(F.pad(grid, (1, 1, 1, 1)), m.stage_inject["0"].conv.weight, groups=16).flatten(2).transpose(1, 2)
        x = bb.stage_transition(1, y + g, ctx)                        # then the merge: B×64×32
        for i in (2, 3):
            x = bb.run_block(i, x, ctx)
        expect = m.head(bb.pool(bb.finish(x, ctx), ctx))              # final LN on every token, then the mean
        assert torch.allclose(m(**batch).logits, expect, atol=1e-5)


@pytest.mark.parametrize("opts, fragment", [
    ({"read_blocks": (0, 1, 2, 3), "add_blocks": (2, 3)}, "block(s) [0, 1] read stage 0 (blocks 0..1), which has no add-back"),
    ({"read_blocks": (0, 1), "add_blocks": (1, 2)},
     "the first add-back of stage 1 (blocks 2..3) (after block 2) comes before the first read block of stage 1"),
    ({"read_blocks": (0, 1, 2, 3), "add_blocks": (0, 2, 3)}, "block(s) [1] come after the last add-back of stage 0"),
])
def test_swin_bad_block_sets(opts, fragment):
    with pytest.raises(ConfigError) as e:
        wrap("tiny-swin", **opts)
    assert fragment in str(e.value)


def test_swin_trunk_cache_in_a_later_stage_is_bit_identical():
    opts = {"add_blocks": (2, 3)}                                     # trunk: stage 0, the merge, block 2
    plain, _, _ = train_losses("tiny-swin", **opts)
    cached, calls, m = train_losses("tiny-swin", cache_trunk=True, **opts)
    assert cached == plain and plain[3:] != plain[:3]
    assert calls == [3, 0] and m.trunk_cache.hits == 3


# -- memory at ViT-B/16 shapes ---------------------------------------------------------------------------
def test_saved_bytes_vit_b():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig()                              # ViT-B/16, 224 px: T = 197, D = 768, fp32
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    vit = ViTModel(cfg)
    batch = {"pixel_values": torch.randn(1, 3, 224, 224), "labels": torch.tensor([1])}

    def measure(config):
        model = memtune.wrap(vit, config, num_labels=10)
        return saved_bytes(model, lambda: model(**batch).loss)

    full = measure(config_for("full"))             # before the others freeze the shared backbone
    dtl = {s: measure(config_for("dtl", {"add_blocks": tuple(range(s, 12))})) for s in (0, 3, 9)}
    dtl[6] = measure(config_for("dtl"))            # the default add-backs are 6..11
    lora = measure(config_for("lora", {"r": 8, "target_modules": ("q_proj", "k_proj", "v_proj")}))
    assert dtl[6] / full <= 0.40                   # measured 0.318 (docs/methods/dtl.md §11: ≈ 0.35)
    assert dtl[6] / lora <= 0.60                   # measured 0.467 (reference ≈ 0.51)
    assert 0.55 <= dtl[0] / full <= 0.75           # s0 = 0: about LoRA's level (measured 0.63, reference ≈ 0.69)
    assert dtl[0] > dtl[3] > dtl[6] > dtl[9]       # saved bytes fall as s0 grows


# -- trunk cache -----------------------------------------------------------------------------------------
def train_losses(name, epochs=2, **opts):
    """Two epochs over fixed batches (fixed order); returns every step's loss."""
    m = wrap(name, "dtl+", **opts).train()
    batches = []
    for k in range(3):
        b = batch_for(name, seed=10 + k)
        b["example_id"] = torch.arange(len(b["labels"])) + 100 * k
        batches.append(b)
    losses, calls_per_epoch = train_epochs(m, [batches] * epochs)
    return losses, calls_per_epoch, m


@pytest.mark.parametrize("name, store", [("tiny-vit", "memory"), ("tiny-bert", "memory"), ("tiny-bert", "disk")])
def test_trunk_cache_is_bit_identical(name, store, tmp_path):
    plain, plain_calls, _ = train_losses(name)
    opts = {"cache_trunk": True}
    on_disk = store == "disk"
    if on_disk:
        opts["cache_dir"] = str(tmp_path)
    cached, cached_calls, m = train_losses(name, **opts)
    assert cached == plain                          # exact, every step of both epochs
    assert plain[3:] != plain[:3]                   # training moved (the comparison is not vacuous)
    assert plain_calls == [3, 3] and cached_calls == [3, 0]   # epoch 2 never ran the trunk
    assert m.trunk_cache.hits == 3 and len(m.trunk_cache) == (6 if name == "tiny-vit" else 9)
    if on_disk:
        assert len(list(tmp_path.iterdir())) == 1
        m.trunk_cache.close()
        assert list(tmp_path.iterdir()) == []


def test_trunk_cache_errors():
    m = wrap("tiny-bert", "dtl", cache_trunk=True).train()
    batch = text_batch()
    with pytest.raises(TrunkCacheError, match=r"cache_trunk=True needs batch\['example_id'\]"):
        m(**batch)
    m.eval()
    m(**batch)                                      # evaluation does not use the cache
    m.train()
    batch["example_id"] = torch.tensor([0, 1, 2])
    m(**batch)
    other = text_batch(lengths=(4, 5, 7))           # id 0 now names a different input
    other["example_id"] = torch.tensor([0, 1, 2])
    with pytest.warns(UserWarning, match="the input of example_id 0 differs from the one cached"):
        m(**other)                                  # recomputed, never replayed
    assert m.trunk_cache.hits == 0 and m.trunk_cache.mismatches == 1   # ids 1, 2: same real tokens
    strict = wrap("tiny-bert", "dtl", cache_trunk=True, cache_verify="strict").train()
    strict(**batch)
    with pytest.raises(TrunkCacheError, match="cache_verify=strict refuses them"):
        strict(**other)

    tight = wrap("tiny-bert", "dtl", cache_trunk=True, cache_max_bytes=5_000).train()
    batch["example_id"] = torch.tensor([0, 1, 2])
    with pytest.raises(TrunkCacheError, match="trunk cache budget too small: cache_max_bytes=5000"):
        tight(**batch)

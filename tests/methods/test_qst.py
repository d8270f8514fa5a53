"""QST (Quantized Side Tuning): the checks of docs/methods/qst.md §9 on its tiny LLaMA (d=64, f=172, N=2, H=4, r=4)
and on tiny-bert / tiny-vit, exact parameter counts at LLaMA-2 shapes on the meta device, and the CLI.

The frozen backbone here is fp32 (the 4-bit backbone is a separate technique); every check is about
which tensors the method keeps, which parameters train, and what the output is at the start.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import memtune
from memtune.cli import main
from memtune.methods import ConfigError, config_for
from memtune.methods.qst import QSTConfig, QSTModel
from memtune.methods.qst.downsample import AdapterDownsample, ChannelPool, make_downsample

from ..conftest import has_package
from .side_helpers import assert_blocks_keep_no_graph, assert_side_checkpointing_matches, batch_for, fit_fixed_batch

SPEC_LLAMA = dict(vocab_size=100, hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=3)
LLAMA2 = {   # d, f, N, H, KV; vocab 32000, untied LM head
    "7b": (4096, 11008, 32, 32, 32),
    "13b": (5120, 13824, 40, 40, 40),
    "70b": (8192, 28672, 80, 64, 8),
}


def spec_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SPEC_LLAMA)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def wrap_spec(num_labels=None, seed=0, **opts):
    opts.setdefault("r", 4)
    hf = spec_llama(seed)
    torch.manual_seed(seed + 1)
    return memtune.wrap(hf, config_for("qst", opts), num_labels=num_labels)


def wrap_tiny(name, num_labels=2, seed=0, **opts):
    torch.manual_seed(seed)
    return memtune.wrap(memtune.load_model(name), config_for("qst", opts), num_labels=num_labels)


def make(kind, **opts):
    if kind == "llama-lm":
        return wrap_spec(None, **opts)
    if kind == "llama-cls":
        return wrap_spec(3, **opts)
    return wrap_tiny(kind, **opts)


def randomize_side(model, seed=5):
    """Random weights everywhere in the side network (not the mix), so a check cannot pass by zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.side.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


KINDS = ["llama-lm", "llama-cls", "tiny-bert", "tiny-vit", "tiny-opt", "tiny-distilbert", "tiny-gpt2", "tiny-phi3",
         "tiny-gpt-neox", "tiny-clip-vision", "tiny-siglip-vision", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3",
         "tiny-modernbert", "tiny-deberta-v2"]


# -- config ---------------------------------------------------------------------------------------------------
def test_defaults_string_options_and_bad_values():
    cfg = config_for("qst", {})
    assert isinstance(cfg, QSTConfig) and cfg.model_class is QSTModel
    assert (cfg.r, cfg.k, cfg.downsample, cfg.gate, cfg.mix, cfg.lambda_init, cfg.attention, cfg.attention_dropout,
            cfg.side_heads, cfg.tap_storage, cfg.trunk_dropout, cfg.cache_trunk, cfg.side_checkpointing) == \
        (None, 16, "adapter", "vector", "paper", 1.0, "auto", None, None, "full", True, False, False)
    assert cfg.default_lr == 2e-4 and QSTConfig.lr_for("llama") == 2e-4 and QSTConfig.lr_for("bert") == 1e-3
    cfg = config_for("qst", {"r": "8", "k": "4", "downsample": "avgpool", "gate": "scalar", "mix": "sigmoid",
                             "lambda_init": "2", "side_checkpointing": "true"})
    assert (cfg.r, cfg.k, cfg.downsample, cfg.gate, cfg.mix, cfg.lambda_init, cfg.side_checkpointing) == \
        (8, 4, "avgpool", "scalar", "sigmoid", 2.0, True)
    for bad in ({"r": 0}, {"k": 0}, {"downsample": "conv"}, {"gate": "matrix"}, {"mix": "sum"},
                {"lambda_init": "inf"}, {"attention": "flash"}, {"attention_dropout": -0.1}, {"side_heads": 0},
                {"tap_storage": "fp8"}, {"cache_dtype": "fp8"}, {"cache_max_bytes": 0}, {"colour": 1}):
        with pytest.raises(ConfigError):
            config_for("qst", bad)


def test_r_must_fit_the_heads_and_the_default_is_lowered_for_narrow_models():
    # Spec tiny LLaMA: d=64, H=4; r=16 would give d'=4 and head width 1 (odd: no rotary pairs).
    with pytest.raises(ConfigError, match=r"qst.r=16 .*head width .* is odd.*r values that fit: 1, 2, 4, 8$"):
        wrap_spec(r=16)
    with pytest.raises(ConfigError, match=r"qst.r=3 .*d=64 is not divisible by r=3"):
        wrap_tiny("tiny-bert", r=3)
    with pytest.raises(ConfigError, match=r"side width d/r=2 is not divisible by the 4 attention heads"):
        wrap_tiny("tiny-vit", r=32)
    with pytest.warns(UserWarning, match="r=16 does not fit .* using r=8"):
        model = wrap_spec(r=None)
    assert model.r == 8 and model.side_config.hidden_size == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # 16 fits BERT (head width 1 has no rotary)
        assert wrap_tiny("tiny-bert").r == 16


def test_cli_refuses_a_reduction_factor_that_does_not_fit(capsys, tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"{'good' if i % 2 else 'bad'} text {i},{i % 2}\n" for i in range(20)))
    code = main(["train", "--model", "tiny-bert", "--task", f"csv:{data}", "--method", "qst", "--r", "3",
                 "--max-steps", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == ("memtune: error: qst.r=3 does not fit this bert backbone: d=64 is not divisible by r=3; "
                      "r values that fit: 1, 2, 4, 8, 16")
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


# -- §9.1 / §9.2: no backbone graph, exact trainable set ---------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_backbone_records_no_graph_and_gets_no_grad(kind):
    model = make(kind).train()
    assert_blocks_keep_no_graph(model, list(model.backbone.blocks), batch_for(model))


@pytest.mark.parametrize("kind", KINDS)
def test_exactly_the_side_network_the_mix_and_the_head_get_gradients(kind):
    model = make(kind).train()
    model(**batch_for(model)).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    N = model.backbone.num_layers
    expected = {"side.gates", "side.up.weight", "side.up.bias", "mix.weight"}
    for i in range(N):
        expected |= {f"side.downsamples.{i}.{w}" for w in ("down.weight", "up.weight", "norm.weight", "norm.bias")}
        expected |= {f"side.blocks.{i}.{n}" for n, _ in model.side.blocks[i].named_parameters()}
    expected |= {f"side.norm.{n}" for n, _ in model.side.norm.named_parameters()}
    if model.head is not None:
        expected |= {f"head.{n}" for n, _ in model.head.named_parameters()}
    assert got == expected == {n for n, _ in model.trainable_named_parameters()}
    if kind in ("llama-lm", "llama-cls"):
        assert "side.norm.weight" in got                       # RMSNorm side final norm
    if kind == "llama-cls":
        assert model.head.bias is None and model.head.weight.shape == (3, 64)   # Score: d×C, no bias
    # Paper form at the start: α = 1, so ∂o/∂u = 1 − α = 0 and only α (∂L/∂α = (h_N − u)·∂L/∂o) moves
    # in the first step; from the second step on every trainable tensor gets a non-zero gradient.
    assert model.mix.weight.grad.abs().sum() > 0
    assert all(torch.all(p.grad == 0) for n, p in model.named_parameters() if n.startswith("side."))
    params = [p for _, p in model.trainable_named_parameters()]
    torch.optim.SGD(params, lr=0.1).step()
    model.zero_grad(set_to_none=True)
    model(**batch_for(model)).loss.backward()
    for n, p in model.trainable_named_parameters():
        assert p.grad.abs().sum() > 0, n


# -- §9.3: parameter counts at LLaMA-2 shapes (meta device) --------------------------------------------------------
def llama2_on_meta(size, num_labels=None, **opts):
    d, f, N, H, KV = LLAMA2[size]
    cfg = LlamaConfig(vocab_size=32000, hidden_size=d, intermediate_size=f, num_hidden_layers=N,
                      num_attention_heads=H, num_key_value_heads=KV)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
        return memtune.wrap(hf, QSTConfig(**opts), num_labels=num_labels)


def qst_formula(d, f, N, H, KV, r=16, k=16, downsample="adapter"):
    """docs/methods/qst.md §5: side blocks + downsamples + gates + side norm + Up (λ/α and a classifier not included)."""
    ds, fs = d // r, f // r
    blocks = N * (2 * ds * ds + 2 * ds * (KV * ds // H) + 3 * ds * fs + 2 * ds)
    down = N * (k * (d + ds) + 2 * ds) if downsample == "adapter" else N * d * ds
    return blocks + down + N * ds + ds + (ds * d + d)


def split(model):
    down = sum(p.numel() for n, p in model.trainable_named_parameters() if n.startswith("side.downsamples."))
    side = sum(p.numel() for n, p in model.trainable_named_parameters() if n.startswith("side."))
    return side, down


@pytest.mark.parametrize("size,expected", [("7b", 28_619_008), ("13b", 54_751_040), ("70b", 282_935_808)])
def test_parameter_count_at_llama2_shapes(size, expected):
    d, f, N, H, KV = LLAMA2[size]
    model = llama2_on_meta(size)
    side, down = split(model)
    assert model.r == 16 and model.side_config.head_dim == 8
    assert side == qst_formula(d, f, N, H, KV) == expected
    assert model.mix.weight.numel() == d                       # λ/α, registered and trained
    assert model.num_parameters_split()[0] == expected + d
    if size == "7b":
        assert sum(p.numel() for p in model.backbone.parameters()) == 6_738_415_616
        assert round(100 * down / side, 2) == 7.84


def test_parameter_count_linear_downsample_and_classifier_at_7b():
    d, f, N, H, KV = LLAMA2["7b"]
    side, down = split(llama2_on_meta("7b", downsample="linear"))
    assert side == qst_formula(d, f, N, H, KV, downsample="linear") == 59_928_832
    assert round(100 * down / side, 1) == 56.0
    model = llama2_on_meta("7b", num_labels=2)
    assert model.num_parameters_split()[0] == 28_619_008 + d + 2 * d      # + α + Score (d×C, no bias)


# -- §9.4 / §9.5: wiring and downsample modules ----------------------------------------------------------------------
def test_shapes_and_wiring_use_d0_twice():
    model = wrap_spec().train()
    N, d_side = 2, 16
    assert model.side_config.hidden_size == d_side and model.side_config.intermediate_size == 43
    assert model.side_config.head_dim == 4 and model.side_config.num_key_value_heads == 2
    assert len(model.side.downsamples) == len(model.side.blocks) == N
    assert model.side.gates.shape == (N, d_side) and torch.all(model.side.gates == 0.5)
    calls, side_out = [0] * N, []
    for i, m in enumerate(model.side.downsamples):
        m.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    for b in model.side.blocks:
        b.register_forward_hook(lambda m, a, o: side_out.append(o))
    batch = batch_for(model)
    out = model(**batch)
    assert calls == [2, 1] and sum(calls) == N + 1             # D_0 reads the embedding and block 0's output
    assert [tuple(s.shape) for s in side_out] == [(3, 9, d_side)] * N
    assert out.logits.shape == (3, 9, 100)


def test_downsample_parameter_counts_and_pooling():
    d, ds, k, r = 64, 16, 16, 4
    assert sum(p.numel() for p in make_downsample("adapter", d, ds, k, r).parameters()) == k * (d + ds) + 2 * ds
    assert sum(p.numel() for p in make_downsample("lora", d, ds, k, r).parameters()) == k * (d + ds) + 2 * ds
    assert sum(p.numel() for p in make_downsample("linear", d, ds, k, r).parameters()) == d * ds
    x = torch.randn(2, 5, d)
    for kind, reduce in (("avgpool", lambda g: sum(g) / r), ("maxpool", lambda g: torch.stack(g).amax(0))):
        pool = make_downsample(kind, d, ds, k, r)
        assert isinstance(pool, ChannelPool) and not list(pool.parameters())
        expected = torch.stack([reduce([x[..., j * r + c] for c in range(r)]) for j in range(ds)], -1)
        torch.testing.assert_close(pool(x), expected, rtol=0, atol=1e-6)   # fp32 sum of 4 values of size ~1
    # The adapter's activation is swish; the LoRA form has none (its map is linear in x).
    lora = AdapterDownsample(d, ds, k, activation=False)
    with torch.no_grad():
        torch.testing.assert_close(lora.up(lora.down(2 * x)), 2 * lora.up(lora.down(x)))
    model = wrap_spec(downsample="avgpool").train()
    assert not any(n.startswith("side.downsamples.") for n, _ in model.trainable_named_parameters())
    h = torch.randn(1, 3, d)
    assert model.side.downsamples[1](h).grad_fn is None        # no requires_grad path through the pooling


# -- §9.6: saved-tensor census ---------------------------------------------------------------------------------------
def census(model, batch):
    """Storages of the saved non-parameter tensors of last dim d (B×T×d, or the (B·T)×d views that linear
    layers save; the d-vectors α / 1−α are excluded), and the storages of the named candidates."""
    bb, d = model.backbone, model.backbone.hidden_size
    named, hooks = {}, []

    def keep(key):
        return lambda m, a, o: named.__setitem__(key, o)

    hooks.append(bb.decoder.embed_tokens.register_forward_hook(keep("embed")))
    hooks += [b.register_forward_hook(keep(f"h{i}")) for i, b in enumerate(bb.blocks)]
    hooks.append(bb.decoder.norm.register_forward_hook(keep("h_N")))
    hooks.append(model.side.up.register_forward_hook(keep("up")))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    packed = []

    def pack(t):
        packed.append(t)                                        # keep alive: storages are not reused
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    for h in hooks:
        h.remove()
    saved = {t.untyped_storage().data_ptr() for t in packed
             if t.dim() >= 2 and t.shape[-1] == d and t.untyped_storage().data_ptr() not in params}
    loss.backward()
    return saved, {k: v.untyped_storage().data_ptr() for k, v in named.items()}


def test_saved_tensor_census_adapter_keeps_the_n_plus_1_taps_and_the_head_tensors():
    model = wrap_spec().train()
    saved, ptr = census(model, batch_for(model))
    assert saved == {ptr["embed"], ptr["h0"], ptr["h1"], ptr["h_N"], ptr["up"]}
    assert len(saved) == model.backbone.num_layers + 3


def test_saved_tensor_census_avgpool_keeps_only_the_head_tensors():
    model = wrap_spec(downsample="avgpool").train()
    saved, ptr = census(model, batch_for(model))
    assert saved == {ptr["h_N"], ptr["up"]}


# -- §9.9: the starting point ----------------------------------------------------------------------------------------
def backbone_logits(model, batch):
    with torch.no_grad():
        h, ctx = model.backbone(batch)
        return model.backbone.lm_logits(h), h, ctx


def test_paper_mix_starts_exactly_at_the_backbone_for_any_side_weights():
    model = wrap_spec().eval()
    randomize_side(model)
    batch = batch_for(model)
    with torch.no_grad():
        logits = model(**batch).logits
        hf = model.backbone.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref, _, _ = backbone_logits(model, batch)
    # α = 1: o = 1·h_N + 0·u = h_N exactly in floating point (u is finite), so the logits are bit-identical.
    assert torch.equal(logits, ref)
    real = batch["attention_mask"].bool()
    assert (logits[real] - hf[real]).abs().max() < 1e-5        # and HF's own forward agrees (fp32)
    assert torch.all(model.mix.weight == 1)


def test_paper_mix_starts_at_the_backbone_for_encoder_classification():
    model = wrap_tiny("tiny-bert").eval()
    randomize_side(model)
    batch = batch_for(model)
    with torch.no_grad():
        h, ctx = model.backbone(batch)
        expected = model.head(model.backbone.pool(h, ctx))
        assert torch.equal(model(**batch).logits, expected)


def test_code_mode_gates_mix_and_its_limits():
    model = wrap_spec(mix="sigmoid").eval()
    for i in range(2):                                          # σ(0.5) = 0.62246, σ(1) = 0.73106
        torch.testing.assert_close(model.side.beta(i), torch.full((16,), 0.6225), rtol=0, atol=1e-4)
    torch.testing.assert_close(model.mix.backbone_share(), torch.full((64,), 0.7311), rtol=0, atol=1e-4)
    randomize_side(model)
    batch = batch_for(model)
    ref, _, _ = backbone_logits(model, batch)
    ups = []
    model.side.up.register_forward_hook(lambda m, a, o: ups.append(o))
    with torch.no_grad():
        start = model(**batch).logits
        assert (start - ref).abs().max() > 1e-2                # the code's start is not the pretrained model
        model.mix.weight.fill_(1e4)                            # λ → +∞: σ(λ) = 1 in fp32
        assert torch.equal(model(**batch).logits, ref)
        model.mix.weight.fill_(-1e4)                           # λ → −∞: LMHead(Up(s_N))
        side_only = model(**batch).logits
        assert torch.equal(side_only, model.backbone.lm_logits(ups[-1]))
    scalar = wrap_spec(gate="scalar")
    assert scalar.side.gates.shape == (2, 1) and torch.all(scalar.side.beta(1) == 0.5)   # paper: γ = 0


# -- §9.10: gradient checkpointing of the side steps -----------------------------------------------------------------
@pytest.mark.parametrize("kind,downsample", [("llama-lm", "adapter"), ("tiny-bert", "adapter"), ("llama-lm", "avgpool"),
                                             ("tiny-bert", "avgpool")])
def test_side_checkpointing_gives_the_same_loss_and_gradients_and_saves_less(kind, downsample):
    # avgpool has no weight: the checkpoint then keeps the pooled tap (d/r wide) instead of the block output.
    assert_side_checkpointing_matches(lambda ckpt: make(kind, side_checkpointing=ckpt, downsample=downsample))


# -- training and checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama-lm", "tiny-bert", "tiny-vit"])
def test_loss_falls_on_a_fixed_batch(kind):
    model = make(kind).train()
    batch = batch_for(model, b=4)
    model.eval()                                                 # no dropout: one fixed function to fit
    first, last = fit_fixed_batch(model, batch, lr=3e-2, steps=30)
    assert last < 0.5 * first


@pytest.mark.parametrize("name,num_labels", [("tiny-llama", None), ("tiny-bert", 2), ("tiny-vit", 2), ("tiny-opt", None)])
def test_save_and_load_give_bit_identical_outputs(name, num_labels, tmp_path):
    model = wrap_tiny(name, num_labels, r=4, mix="sigmoid").train()
    batch = batch_for(model)
    fit_fixed_batch(model, batch, lr=1e-2, steps=2)                 # trained weights to save
    model.eval().save_pretrained(tmp_path)
    torch.manual_seed(123)                                      # a different fresh init: the load must overwrite it
    loaded = memtune.load(name, tmp_path).eval()
    assert isinstance(loaded, QSTModel) and loaded.method_config == model.method_config
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_other_architectures_of_each_family():
    from transformers import MPNetConfig, MPNetModel, Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    for hf, labels in ((MPNetModel(MPNetConfig(**small)), 2),
                       (Qwen2ForCausalLM(Qwen2Config(**small, num_key_value_heads=2)), None)):
        hf.config._attn_implementation = "eager"
        model = memtune.wrap(hf, QSTConfig(r=4), num_labels=labels).train()
        batch = model.backbone.example_batch(2, 8)
        batch["input_ids"] = batch["input_ids"] % 100
        batch["labels"] = batch["input_ids"] if labels is None else torch.tensor([0, 1])
        model(**batch).loss.backward()
        assert all(p.grad is None for p in model.backbone.parameters())
        assert all(p.grad is not None for _, p in model.trainable_named_parameters())


def test_plans_on_the_meta_device():
    from memtune.memory.plan import PlanSettings, plan

    result = plan(PlanSettings(model="smollm2-135m", batch_size=1, max_length=32, precision="bf16"),
                  ["qst", "qst:downsample=avgpool"])
    adapter, pooled = result.methods
    assert adapter.status == pooled.status == "ok", (adapter.message, pooled.message)
    # SmolLM2-135M: d=576, f=1536, N=30, H=9, KV=3 at r=16 (d'=36, head width 4).
    assert adapter.trainable_params == qst_formula(576, 1536, 30, 9, 3) + 576
    assert pooled.trainable_params == adapter.trainable_params - 30 * (16 * (576 + 36) + 2 * 36)


@pytest.mark.skipif(not has_package("bitsandbytes"), reason="bitsandbytes not installed")
def test_trains_on_an_nf4_backbone():
    """qst+nf4 (the 4-bit technique): block linears become NF4; QST itself is unchanged and still starts at
    the (now quantized) backbone's logits and trains without a gradient into it."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model = memtune.wrap(memtune.load_model("tiny-llama"), QSTConfig(r=4), techniques="nf4")
    linears = [m for b in model.backbone.blocks for m in b.modules() if isinstance(m, (nn.Linear, bnb.nn.Linear4bit))]
    assert linears and all(isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_type == "nf4" for m in linears)
    batch = batch_for(model, b=4)
    ref, _, _ = backbone_logits(model, batch)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, ref)
    first, last = fit_fixed_batch(model, batch, lr=3e-2, steps=30)
    assert last < 0.5 * first
    assert all(p.grad is None for p in model.backbone.parameters())

"""MEFT on encoder-decoders: two reversible stacks, the decoder's F/G holding its cross-attention to the
memory, whose gradient the decoder's spans return to the encoder's (docs/methods/meft.md §11), on every
encoder-decoder family: tiny-t5 (pre-norm RMSNorm), tiny-bart (post-LN, the paper's coupling) and tiny-mbart
(pre-LN with final LayerNorms, the difference coupling).

Bounds follow test_meft_numerics.py: `meft_bounds.span_bounds` per stack (the decoder through `DecoderStack`,
which shows it the decoder's layers, inputs and TwoStream), in float64 with transformers' float32 islands
removed, or in float32. The decoder's adapters are held to the decoder's bound. The encoder's adapters get
their cotangent through ∂L/∂memory, which the decoder's backward computes with the decoder's error, and their
own span adds the encoder's: to first order the two relative errors add, so they are held to the sum. The
bounds are derived per model from its own Jacobians, so BART's post-LN blocks get theirs from the same formula.
"""
import pytest
import torch
import torch.nn.functional as F

import memtune
from memtune.backbones import family_class, tiny_configs
from memtune.memory.saved import SavedTensorCounter, count_saved_inside, saved_bytes
from memtune.methods import ConfigError, config_for
from memtune.methods.meft import MEFTConfig, reconstruction_error
from memtune.methods.meft.reversible import Span, reversible_span
from memtune.models import load_model, model_from_config

from ..conftest import tiny_batch
from .meft_bounds import span_bounds
from .meft_helpers import rel, twin
from .meft_precision import stream_precision_throughout

B, TS, TT = 2, 10, 3                    # batch, encoder tokens (last row: 3 padded), decoder tokens
ENCODER_DECODERS = ("tiny-t5", "tiny-bart", "tiny-mbart")
each_family = pytest.mark.parametrize("name", ENCODER_DECODERS)


@pytest.fixture
def float64_throughout():
    """F and G compute in the streams' float64 everywhere (no float32 norm or softmax inside them)."""
    with stream_precision_throughout():
        yield


def seeded(name: str, layers: int = 4, decoder_layers: int | None = None, dtype=torch.float32, seed: int = 0):
    """A seeded tiny encoder-decoder `name` (d = 64, eager attention) with the given depths (the family's
    `depth_fields`: encoder, then decoder)."""
    cfg = tiny_configs()[name]
    encoder_field, decoder_field = family_class(cfg).depth_fields
    setattr(cfg, encoder_field, layers)
    setattr(cfg, decoder_field, layers if decoder_layers is None else decoder_layers)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_from_config(cfg, dtype)


def wrap(name: str, model=None, seed: int = 1, **options):
    torch.manual_seed(seed)
    return memtune.wrap(load_model(name) if model is None else model, config_for("meft", options), num_labels=3)


def batch_for(model, dtype=torch.float32):
    """B×Ts source tokens (the last row's last 3 padded) and B×Tt decoder tokens, class labels."""
    batch = tiny_batch(model, batch_size=B, length=TS)
    batch["attention_mask"][-1, -3:] = 0
    batch["input_ids"][-1, -3:] = 0
    batch["decoder_input_ids"] = torch.randint(5, 60, (B, TT), generator=torch.Generator().manual_seed(1))
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


class DecoderStack:
    """The decoder stack of a wrapped encoder-decoder as `span_bounds` reads a model: its reversible layers and
    segments, its input (d₀ and the decoder ctx with the current memory) and its TwoStream."""

    def __init__(self, model):
        self.model = model

    reversible_indices = property(lambda self: self.model.decoder_reversible_indices)
    segments = property(lambda self: self.model.decoder_segments)

    def to(self, dtype):
        self.model.to(dtype)
        return self

    def embed(self, batch):
        return self.model.decoder_inputs(batch)

    def two_stream(self, ctx, dtype):
        return self.model.two_stream(ctx, dtype, decoder=True)


def loss_and_grads(model, batch, seed: int = 0):
    """Seeded loss, the gradient of every trainable tensor and ∂L/∂memory (the encoder's finished output)."""
    torch.manual_seed(seed)
    h, ctx = model.embed(batch)
    x1, x2 = model.run_streams(h, ctx)
    memory = model.memory_of(x1, x2, ctx, h.dtype)
    memory.retain_grad()
    d, dctx = model.decoder_embed(batch, memory, ctx)
    y1, y2 = model.run_streams(d, dctx, decoder=True)
    loss = F.cross_entropy(model.head(model.read_out(y1, y2, dctx, d.dtype)), batch["labels"])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads["memory"] = memory.grad.clone()
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def check_against_autograd(model, batch):
    """Equal losses with the same model under ordinary autograd (reversible_layers=0, same dropout masks),
    every gradient within its bound; returns the per-tensor errors and the two stacks' bounds."""
    enc, dec = span_bounds(model, batch), span_bounds(DecoderStack(model), batch)
    loss_rev, got = loss_and_grads(model, batch)
    loss_ref, ref = loss_and_grads(twin(model, reversible_layers=0), batch)
    assert torch.equal(loss_rev, loss_ref)
    assert set(got) == set(ref)
    errors = {k: rel(got[k], ref[k]) for k in ref}
    for name, err in errors.items():
        # head: after the decoder's spans, no recomputation on its path; memory: the decoder's VJP.
        bound = 0.0 if name.startswith("head") else enc.gradients + dec.gradients \
            if name.startswith("adapters.") else dec.gradients
        assert err <= bound, (name, err, bound, str(enc), str(dec))
    return errors, enc, dec


# -- capabilities and refusals ---------------------------------------------------------------------------
@each_family
def test_the_family_declares_both_stacks_sublayers_and_meft_refuses_an_encoder_decoder_without_the_decoders(name):
    family = family_class(tiny_configs()[name])
    assert {"sublayers", "decoder_sublayers"} <= family.capabilities
    assert family.family in MEFTConfig.supported_families()

    class EncoderSublayersOnly(family):
        capabilities = family.capabilities - {"decoder_sublayers"}

    with pytest.raises(ConfigError, match=f"decoder_sublayers.*supported families: .*{family.family}"):
        config_for("meft1").check_family(EncoderSublayersOnly(seeded(name, 2)))
    with pytest.raises(ConfigError, match="reversible_layers counts per stack.*decoder's 2 layers too, got 3"):
        wrap(name, seeded(name, 4, decoder_layers=2), reversible_layers=3)
    model = wrap(name, seeded(name, 4, decoder_layers=2), frozen_layers=1, reversible_layers=2)
    assert (model.reversible_indices, model.upper_indices) == ([1, 2], [3])
    assert (model.decoder_reversible_indices, model.decoder_upper_indices) == ([0, 1], [])
    assert len(model.adapters) == 3 and len(model.decoder_adapters) == 2


@each_family
def test_parameter_count_two_adapters_per_layer_in_both_stacks(name):
    for variant in (1, 2, 3):
        model = wrap(name, variant=variant, bottleneck=4)
        trainable, _ = model.num_parameters_split()
        assert trainable == (4 + 4) * 2 * (2 * 64 * 4 + 4 + 64) + (64 * 3 + 3)     # adapters + head
    plm = memtune.wrap(load_model(name), config_for("meft1", {"readout": "plm"}), num_labels=3)
    assert plm.mix.requires_grad and plm.memory_mix.requires_grad                 # s and the memory's s'


# -- §11.1 the starting point ------------------------------------------------------------------------------
def plm_states(bb, batch):
    """The PLM's input of every encoder block, its output, and the same for the decoder (eval, no graph)."""
    with torch.no_grad():
        h, ctx = bb.embed(batch)
        enc = [h]
        for i in range(bb.num_layers):
            enc.append(bb.run_block(i, enc[-1], ctx))
        d, dctx = bb.decoder_embed(batch, bb.finish_encoder(enc[-1]), ctx["token_mask"])
        dec = [d]
        for i in range(len(bb.decoder_blocks)):
            dec.append(bb.run_decoder_block(i, dec[-1], dctx))
    return enc, dec


@each_family
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_both_stacks_follow_the_plm_and_the_output_equals_it_at_the_zero_factors(name, variant):
    small = {1: {"lam": 0.0}, 2: {"beta": 0.0}, 3: {"lam": 0.0, "beta": 0.0}}[variant]
    model = wrap(name, variant=variant, reversible_layers=0, readout="plm", **small).eval()
    for p in list(model.adapters.parameters()) + list(model.decoder_adapters.parameters()):
        p.data.zero_()
    batch = batch_for(model)
    enc, dec = plm_states(model.backbone, batch)
    for decoder, plm in ((False, enc), (True, dec)):
        states = model.stream_states(batch, decoder=decoder)
        assert len(states) == len(plm)
        assert all(rel(pair[model.plm_stream], h) <= 1e-5 for pair, h in zip(states, plm)), decoder
    with torch.no_grad():
        finished, ctx = model.backbone(batch)
        assert rel(model.features(batch), model.backbone.pool(finished, ctx)) <= 1e-5
    # The paper's factors and adapter init: close to the PLM in both stacks, but not equal.
    model = wrap(name, variant=variant).eval()
    for decoder, plm in ((False, enc), (True, dec)):
        states = model.stream_states(batch, decoder=decoder)[1:]
        devs = [rel(pair[model.plm_stream], h) for pair, h in zip(states, plm[1:])]
        assert 0 < max(devs) < 0.5, (decoder, devs)


# -- §11.2 inversion, §11.3 gradients against ordinary autograd ------------------------------------------------
@each_family
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_inverse_recovers_the_inputs_of_both_stacks(name, variant, float64_throughout):
    model = wrap(name, load_model(name, dtype=torch.float64), variant=variant).train()
    batch = batch_for(model, torch.float64)
    for decoder, stack in ((False, model), (True, DecoderStack(model))):
        report = reconstruction_error(model, batch, segment_layers=4, decoder=decoder)
        bounds = span_bounds(stack, batch, segment_layers=4)
        assert bounds.precision == torch.float64 and report.segments == [[0, 1, 2, 3]]
        assert report.max_error > 0
        assert all(e <= b for e, b in zip(report.errors, bounds.layer_bounds)), (decoder, str(report), str(bounds))


@each_family
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_gradients_match_autograd_float64_four_layer_segments(name, variant, float64_throughout):
    model = wrap(name, load_model(name, dtype=torch.float64), variant=variant, segment_layers=4).train()
    errors, enc, dec = check_against_autograd(model, batch_for(model, torch.float64))
    assert enc.precision == dec.precision == torch.float64
    assert errors["memory"] > 0                     # really recomputed, not copied from ordinary autograd


@each_family
@pytest.mark.parametrize("variant", [1, 2, 3])
def test_gradients_match_autograd_float32_single_layer_segments_and_automatic(name, variant):
    model = wrap(name, variant=variant, segment_layers=1).train()
    check_against_autograd(model, batch_for(model))
    # Automatic segments, chosen per stack on the first training batch: both within the tolerance there.
    model = wrap(name, variant=variant).train()
    batch = batch_for(model)
    check_against_autograd(model, batch)
    for report in (model.report, model.decoder_report):
        assert report.automatic and report.ok, str(report)
    assert "decoder layers 0-3 reversible" in model.describe()


@each_family
def test_encoder_adapters_learn_only_through_the_memory_gradient(name, float64_throughout):
    model = wrap(name, load_model(name, dtype=torch.float64), variant=1, segment_layers=2).train()
    batch = batch_for(model, torch.float64)
    # The decoder's reversible spans take the memory as an input of the autograd Function.
    h, ctx = model.embed(batch)
    memory = model.memory_of(*model.run_streams(h, ctx), ctx, h.dtype)
    _, dctx = model.decoder_embed(batch, memory, ctx)
    span = Span(model.two_stream(dctx, h.dtype, decoder=True), model.decoder_segments[0])
    assert len(span.inputs) == 1 and span.inputs[0] is memory
    errors, _, _ = check_against_autograd(model, batch)
    _, got = loss_and_grads(model, batch)
    encoder = [k for k in got if k.startswith("adapters.")]
    assert encoder and all(got[k].abs().sum() > 0 for k in encoder)
    # Cut the memory's graph: the encoder's adapters then get no gradient at all, the decoder's still do.
    torch.manual_seed(0)
    d, dctx = model.decoder_embed(batch, memory.detach(), ctx)
    y1, y2 = model.run_streams(d, dctx, decoder=True)
    F.cross_entropy(model.head(model.read_out(y1, y2, dctx, d.dtype)), batch["labels"]).backward()
    assert all(p.grad is None for p in model.adapters.parameters())
    assert all(p.grad is not None for p in model.decoder_adapters.parameters())


# -- §11.4 frozen PLM, no graph in the blocks ------------------------------------------------------------------
@each_family
def test_frozen_backbone_gets_no_grad_and_no_block_records_a_graph(name):
    model = wrap(name, variant=3, segment_layers=2).train()
    bb = model.backbone
    batch = batch_for(model)
    blocks = list(bb.blocks) + list(bb.decoder_blocks)
    assert [id(b) for b in model.graph_free_blocks()] == [id(b) for b in blocks]
    with count_saved_inside(blocks + [bb.model.shared], model) as inside:
        loss = model(**batch).loss
    assert inside.count == 0 and inside.bytes == 0
    loss.backward()
    assert all(p.grad is None for p in bb.parameters())
    adapters = list(model.adapters.parameters()) + list(model.decoder_adapters.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)


# -- §11.5 saved bytes ------------------------------------------------------------------------------------------
@each_family
def test_saved_bytes_fall_against_ordinary_autograd_and_do_not_grow_with_depth(name):
    d = 64
    rev, vanilla = [], []
    for layers in (2, 4):
        model = wrap(name, seeded(name, layers), variant=1, segment_layers=layers).train()
        batch = batch_for(model)
        rev.append(saved_bytes(model, lambda: model(**batch).loss))
        ref = twin(model, reversible_layers=0)
        vanilla.append(saved_bytes(ref, lambda: ref(**batch).loss))
    assert rev[0] == rev[1] and vanilla[0] < vanilla[1] and rev[1] < vanilla[0]
    # A decoder span saves its B×Tt×2d output and the memory B×Ts×d it reads, nothing else.
    h, ctx = model.embed(batch)
    memory = torch.randn(B, TS, d, requires_grad=True)
    dec, dctx = model.decoder_embed(batch, memory, ctx)
    span = Span(model.two_stream(dctx, h.dtype, decoder=True), model.decoder_reversible_indices)
    counter = SavedTensorCounter(model)
    with counter():
        out = reversible_span(span, torch.cat([dec, dec], dim=-1))
    assert counter.bytes == (B * TT * 2 * d + B * TS * d) * 4
    out.sum().backward()
    assert memory.grad is not None and memory.grad.abs().sum() > 0


@each_family
def test_text_to_text_objective_reads_the_plm_streams_and_matches_autograd(name, float64_throughout):
    # num_labels=None on an encoder-decoder: the seq2seq objective (labels B×Tt target ids) through the tied LM
    # head, which needs the PLM's hidden state, so the read-out is the PLM stream (+ s·other, s = 0) in both stacks.
    torch.manual_seed(1)
    try:
        model = memtune.wrap(load_model(name, dtype=torch.float64), config_for("meft1", {"segment_layers": 4}),
                             num_labels=None).train()
    except ConfigError as e:
        pytest.skip(f"no text-to-text objective here: {e}")
    assert model.objective == "seq2seq" and model.readout_mode == "plm"
    ids = torch.randint(5, 60, (B, TS), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(5, 60, (B, TT + 1), generator=torch.Generator().manual_seed(2))}
    ref = twin(model, reversible_layers=0)
    runs = []
    for m in (model, ref):
        torch.manual_seed(0)
        loss = m(**batch).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}))
    (loss_rev, got), (loss_ref, want) = runs
    assert torch.equal(loss_rev, loss_ref) and set(got) == set(want) >= {"mix", "memory_mix"}
    dec = span_bounds(DecoderStack(model), batch).gradients
    bound = span_bounds(model, batch).gradients + dec
    assert max(rel(got[k], want[k]) for k in want) <= bound
    # The encoder's adapters learn through the memory. Only the top layer's G (MEFT1: the reversible adapter)
    # feeds nothing but the non-PLM stream, which s' = 0 leaves out of the memory: zero until s' moves.
    zero = {k for k in want if k.startswith("adapters.") and not got[k].any()}
    assert zero == {f"adapters.3.rev.{w}.{t}" for w in ("down", "up") for t in ("weight", "bias")}, zero
    assert got["memory_mix"].abs() > 0


# -- training --------------------------------------------------------------------------------------------------
@each_family
def test_training_reduces_the_loss_and_the_checkpoint_round_trips(name, tmp_path):
    model = wrap(name, variant=1).train()
    batch = batch_for(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    loaded = memtune.load(load_model(name), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, model(**batch).logits, atol=1e-6)

"""The backbone protocol against Hugging Face's own forward, on every tiny family (`memtune.models.TINY`).

`embed` → `run_block` for each block → `finish` must reproduce the pretrained computation, since the baselines
and every side method take it as the reference: block by block (each block's input equals HF's hidden state
there), at the end (last hidden state; encoder–decoders: the encoder's and the decoder's; decoders: the logits
through `lm_logits`), with padding in the text batches. Families that declare sub-layers must compose them to
the block exactly, in eval and in train mode (same seed, same dropout masks).

Tolerance: the protocol runs the same modules on the same tensors as the HF forward; what it may do differently
is glue (how a mask is built, where a residual is added), which reorders at most a few fp32 additions per block.
Each costs ≤ 2⁻²⁴ of the value's size and LayerNorm / RMSNorm keep the states O(max |h|), so through N blocks
and the final norm the difference is bounded by 4·(N + 1)·2⁻²⁴·max |h| (4·5·6e-8 ≈ 1.2e-6 relative here).
"""
import pytest
import torch

from memtune.backbones import backbone_for
from memtune.models import TINY, load_model

EPS32 = torch.finfo(torch.float32).eps / 2                     # unit roundoff 2⁻²⁴


def tiny_backbone(name):
    model = load_model(name).model.eval()
    return model, backbone_for(model)


def padded_batch(bb, seed=0):
    """B = 2: text rows of 10 tokens, the second with its last 3 padded (decoder input: 3 tokens); images
    32×32 with values from N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    if "pixel_values" in bb.input_keys:
        size = bb.config.image_size
        return {"pixel_values": torch.randn(2, 3, size, size, generator=g)}
    ids = torch.randint(5, 60, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if hasattr(bb, "decoder_blocks"):
        batch["decoder_input_ids"] = torch.randint(5, 60, (2, 3), generator=g)
    return batch


def assert_roundoff_close(got, ref, depth, what):
    bound = 4 * (depth + 1) * EPS32 * ref.abs().max().item()
    diff = (got - ref).abs().max().item()
    assert got.shape == ref.shape, (what, got.shape, ref.shape)
    assert diff <= bound, f"{what}: max |protocol − HF| = {diff:.3g} > {bound:.3g}"


def block_inputs(run_block, n, h, ctx):
    """The input of each of n blocks and the last block's output."""
    inputs = []
    for i in range(n):
        inputs.append(h)
        h = run_block(i, h, ctx)
    return inputs, h


@pytest.mark.parametrize("name", TINY)
def test_protocol_forward_equals_the_hf_forward_block_by_block(name):
    model, bb = tiny_backbone(name)
    batch = padded_batch(bb)
    n = bb.num_layers
    with torch.no_grad():
        ref = model(**bb.model_inputs(batch), output_hidden_states=True)
        h0, ctx = bb.embed(batch)
        inputs, h = block_inputs(bb.run_block, n, h0, ctx)
        finished = bb.finish(h, ctx)
        through_forward, _ = bb(batch)
        encoder_decoder = hasattr(bb, "decoder_blocks")
        hidden = ref.encoder_hidden_states if encoder_decoder else ref.hidden_states
        # One HF state per block; hierarchical stacks (Swin) report one per stage: its first block's input.
        points = bb.stage_starts if len(bb.stage_starts) > 1 else range(n)
        assert len(hidden) == len(points) + 1
        for k, i in enumerate(points):
            assert_roundoff_close(inputs[i], hidden[k], i, f"{name}: input of block {i}")
        assert torch.equal(through_forward, finished)            # Backbone.forward is this same loop
        if encoder_decoder:
            memory = bb.finish_encoder(h)
            assert_roundoff_close(memory, ref.encoder_last_hidden_state, n, f"{name}: encoder output")
            d0, dctx = bb.decoder_embed(batch, memory, ctx["token_mask"])
            m = len(bb.decoder_blocks)
            d_inputs, d = block_inputs(bb.run_decoder_block, m, d0, dctx)
            for i in range(m):
                assert_roundoff_close(d_inputs[i], ref.decoder_hidden_states[i], n + i,
                                      f"{name}: input of decoder block {i}")
            assert torch.equal(bb.finish_decoder(d), finished)
            assert_roundoff_close(finished, ref.last_hidden_state, n + m, f"{name}: decoder output")
        elif bb.is_causal_lm:
            base = model.base_model(**bb.model_inputs(batch)).last_hidden_state
            assert_roundoff_close(finished, base, n, f"{name}: last hidden state")
            assert_roundoff_close(bb.lm_logits(finished), ref.logits, n + 1, f"{name}: logits")
        else:
            assert_roundoff_close(finished, ref.last_hidden_state, n, f"{name}: last hidden state")


def assert_sublayers_compose(bb, batch, label):
    """ffn_sublayer ∘ attention_sublayer == run_block bit for bit, block by block, in eval and in train mode
    (dropout on: the same seed must draw the same masks)."""
    for training in (False, True):
        bb.train(training)
        with torch.no_grad():
            h, ctx = bb.embed(batch)
            for i in range(bb.num_layers):
                torch.manual_seed(i)
                block = bb.run_block(i, h, ctx)
                torch.manual_seed(i)
                composed = bb.ffn_sublayer(i, bb.attention_sublayer(i, h, ctx), ctx)
                assert torch.equal(composed, block), (label, i, training)
                h = block


def assert_decoder_sublayers_compose(bb, batch, label):
    """decoder_ffn_sublayer ∘ decoder_cross_sublayer ∘ decoder_attention_sublayer == run_decoder_block bit for
    bit, block by block, in eval and in train mode (same seed, same dropout masks), reading the finished
    encoder output as memory."""
    for training in (False, True):
        bb.train(training)
        with torch.no_grad():
            h, ctx = bb.embed(batch)
            memory = bb.finish_encoder(bb.forward_intermediates(h, ctx)[0])
            d, dctx = bb.decoder_embed(batch, memory, ctx["token_mask"])
            for i in range(len(bb.decoder_blocks)):
                torch.manual_seed(i)
                block = bb.run_decoder_block(i, d, dctx)
                torch.manual_seed(i)
                a = bb.decoder_attention_sublayer(i, d, dctx)
                composed = bb.decoder_ffn_sublayer(i, bb.decoder_cross_sublayer(i, a, dctx), dctx)
                assert torch.equal(composed, block), (label, i, training)
                d = block


@pytest.mark.parametrize("name", TINY)
def test_sublayers_compose_to_the_block(name):
    _, bb = tiny_backbone(name)
    if "sublayers" not in bb.capabilities:
        pytest.skip(f"the {bb.family} backbone declares no sub-layers")
    batch = padded_batch(bb)
    assert_sublayers_compose(bb, batch, name)
    # The branch hook edits the branch before the residual: an identity edit changes nothing, another does (a
    # scaling: a constant shift would vanish in a post-LN block's LayerNorm, which removes the mean).
    bb.eval()
    with torch.no_grad():
        h, ctx = bb.embed(batch)
        block = bb.run_block(0, h, ctx)
        a = bb.attention_sublayer(0, h, ctx, branch_hook=lambda inp, u: u)
        assert torch.equal(bb.ffn_sublayer(0, a, ctx, branch_hook=lambda inp, u: u), block)
        edited = bb.ffn_sublayer(0, bb.attention_sublayer(0, h, ctx), ctx, branch_hook=lambda inp, u: 2 * u)
        assert not torch.allclose(edited, block)
    if "decoder_sublayers" not in bb.capabilities:
        return
    assert_decoder_sublayers_compose(bb, batch, name)
    # The decoder's hooks edit their branches the same way: identity edits change nothing, others do.
    bb.eval()
    with torch.no_grad():
        memory = bb.finish_encoder(bb.forward_intermediates(h, ctx)[0])
        d, dctx = bb.decoder_embed(batch, memory, ctx["token_mask"])
        block = bb.run_decoder_block(0, d, dctx)
        same = lambda inp, u: u                                          # noqa: E731
        a = bb.decoder_attention_sublayer(0, d, dctx, branch_hook=same)
        c = bb.decoder_cross_sublayer(0, a, dctx, branch_hook=same)
        assert torch.equal(bb.decoder_ffn_sublayer(0, c, dctx, branch_hook=same), block)
        shifted = bb.decoder_cross_sublayer(0, a, dctx, branch_hook=lambda inp, u: 2 * u)
        assert not torch.allclose(bb.decoder_ffn_sublayer(0, shifted, dctx), block)
        # The cross-attention reads ctx["memory"] at call time: other memory, other output.
        dctx["memory"] = memory.flip(0)
        assert not torch.allclose(bb.decoder_cross_sublayer(0, a, dctx), c)

"""QST on encoder–decoders (T5, BART, mBART): a side encoder over the encoder blocks and a side decoder over the
decoder blocks, each a `SideNetwork` of the backbone's own block class at width d' = d/r (docs/methods/qst.md,
"Encoder–decoders"). Shapes: B batch, Ts source tokens, Tt decoder positions, d backbone width, d' side width.

    with no_grad: e, ctx = embed(batch)                          # e: B×Ts×d
    s = D^enc_0(e)                                                # B×Ts×d'
    for i in 0..N_enc-1:
        with no_grad: h_i = encoder block i                       # B×Ts×d
        s = G^enc_i((1−β_i)⊙D^enc_i(h_i) + β_i⊙s)
    s_enc = Norm_side_enc(s)                                      # B×Ts×d', the side decoder's memory
    with no_grad: memory = finish_encoder(h_N);  g, dctx = decoder_embed(batch, memory)   # g: B×Tt×d
    t = D^dec_0(g)                                                # B×Tt×d'
    for j in 0..N_dec-1:
        with no_grad: g_j = decoder block j                       # reads the backbone's memory
        t = G^dec_j((1−β'_j)⊙D^dec_j(g_j) + β'_j⊙t)               # causal; cross-attends to s_enc
    with no_grad: g_N = finish_decoder(g_N)
    o = mix(g_N, Up(Norm_side_dec(t)))                            # B×Tt×d; paper form: o = g_N at init

The side decoder's cross-attention reads the side encoder's output only (with the source padding mask), as
LST's T5 form does; the backbone decoder reads the backbone encoder's. Classification pools o the backbone's
way (T5: the start position; BART: the last real input token); text-to-text sends o through the frozen tied
LM head. Both stacks run interleaved with their side stack, so at most one backbone hidden state of each stack
is alive besides those the downsamples keep for backward (and the backbone's memory, which the decoder reads).
"""
from __future__ import annotations

import torch
from torch import nn

from .side import SideNetwork

STACKS = {"encoder": False, "decoder": True}      # side stack name → mirrors the backbone's decoder stack


class EncoderDecoderSide(nn.Module):
    """The two side stacks, `encoder` (no Up: its normed output is the side decoder's memory) and `decoder`
    (with the Up to width d), and their side configs (`configs[name]`, not modules)."""

    def __init__(self, backbone, config, r: int, attention: str):
        super().__init__()
        self.configs = {}
        for name, decoder in STACKS.items():
            cfg = backbone.side_config(backbone.stack_config(decoder), r, attention=attention,
                                       attention_dropout=config.side_attention_dropout(attention, None),
                                       heads=config.side_heads, exact=True)
            depth = len(backbone.decoder_blocks if decoder else backbone.blocks)
            blocks = [backbone.make_side_block(cfg, j, decoder) for j in range(depth)]
            norm = backbone.side_norm(cfg.hidden_size, cfg)
            side = SideNetwork(backbone.hidden_size, cfg.hidden_size, r, blocks, norm, config.downsample, config.k,
                               config.gate, config.tap_storage, up=decoder)
            self.configs[name] = cfg
            self.add_module(name, side)

    def forward(self, model, batch):
        """Returns (o, ctx, g_N): o the mixed decoder states B×Tt×d, ctx the encoder's (with "batch" and
        "token_mask", which the backbone's pooling reads), g_N the frozen backbone's finished decoder states.
        `model.side_step` runs each side step (gate fusion, downsample, side block; optionally checkpointed)."""
        bb = model.backbone
        with torch.no_grad():
            h, ctx = bb.embed(batch)                                           # B×Ts×d; token_mask B×Ts
        s = self.encoder.start(h)                                              # B×Ts×d'
        sctx = bb.side_context(s, ctx, self.configs["encoder"])
        for i, h in bb.iter_blocks(h, ctx, bb.num_layers):
            s = model.side_step(self.encoder, i, s, h, sctx)
        s_enc = self.encoder.finish(s)                                         # B×Ts×d'
        with torch.no_grad():
            memory = bb.finish_encoder(h)                                      # B×Ts×d
            g, dctx = bb.decoder_embed(batch, memory, ctx["token_mask"])       # B×Tt×d
        del h, memory                                    # free h_N now; the decoder reads memory from dctx
        t = self.decoder.start(g)                                              # B×Tt×d'
        tctx = bb.side_decoder_context(t, s_enc, ctx["token_mask"], self.configs["decoder"])
        for j, g in bb.iter_blocks(g, dctx, len(bb.decoder_blocks), decoder=True):
            t = model.side_step(self.decoder, j, t, g, tctx)
        with torch.no_grad():
            g_final = bb.finish_decoder(g)                                     # B×Tt×d
        return model.mix(g_final, self.decoder.finish(t)), ctx, g_final

"""The DTL model: a frozen trunk (embedding + blocks 0..s₀, no autograd graph) and a Compact Side Network.

    x_0 = embed(input)                         # frozen, no graph
    for i in 0..s₀:  x_{i+1} = f_i(x_i)         # pretrained-exact, torch.no_grad, eval mode (see below)
    h = Σ_{i ∈ L, i ≤ s₀} read_i(x_i)          # side state B×T×D; grads reach A_i, B_i (x_i is a constant)
    x = x_{s₀+1} + G(θ_β(h))                    # first injection, after block s₀ = min S
    for i in s₀+1..N−1:                          # on the backprop path (frozen weights, input needs grad)
        if i ∈ L: h = h + read_i(x)               # reads the block INPUT
        x = f_i(x)
        if i ∈ S: x = x + G(θ_β(h))               # writes the block OUTPUT, with the full running sum
    patch grid (ViT): feats = LN_final(mean of patch tokens of x)   # pool first, then the final LayerNorm
    sequence (BERT):  feats = pool(finish(x))                        # the family's own pooling

Choices the paper leaves open (documented here, tested in tests/methods/test_dtl.py):
- Trunk mode. The embedding and blocks 0..s₀ run in eval mode (no dropout / DropPath) during training too,
  so the trunk is a deterministic function of the input: this is what makes trunk caching exact, and the
  uncached path does the same so both give bit-identical results. The reference code keeps DropPath active
  in these blocks; `trunk_dropout=True` restores that (and cannot be combined with `cache_trunk`). Blocks
  after s₀ follow the module's train/eval mode as usual.
- Padding (BERT-like). The trunk's outputs (tap inputs x_i, i ≤ s₀, and block s₀'s output) have padded rows
  set to zero. Real tokens never attend to padded keys, so nothing a real token computes changes; it only
  makes the cached and uncached paths identical (the cache stores real rows only).
- Side state. h is accumulated over the whole stack (never reset): ViT-like and BERT-like encoders keep one
  width D throughout.
"""
from __future__ import annotations

import torch
from torch import nn

from ...backbones.base import take_indices
from ..base import ConfigError, MemtuneModel
from ..common.trunk_cache import TrunkCache, cached_trunk, trunk_eval_mode
from .side import Injection, LowRankRead


def default_add_blocks(num_layers: int) -> tuple[int, ...]:
    """Add-back blocks s₀..N−1 with s₀ = max(0, ⌊7N/12⌋ − 1): ViT-B (N=12) → 6..11 as the reference code,
    so blocks 7..11 (5 of 12) are on the backprop path; MiniLM (N=6) → 2..5; N=4 → 1..3; N=30 → 16..29."""
    s0 = max(0, (7 * num_layers) // 12 - 1)
    return tuple(range(s0, num_layers))


class DTLModel(MemtuneModel):
    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        n, d = backbone.num_layers, backbone.hidden_size
        name = config.name
        add = (default_add_blocks(n) if config.add_blocks is None
               else take_indices(n, config.add_blocks, f"{name}.add_blocks", ConfigError))
        read = (tuple(range(add[-1] + 1)) if config.read_blocks is None
                else take_indices(n, config.read_blocks, f"{name}.read_blocks", ConfigError))
        if read[0] > add[0]:
            raise ConfigError(f"{name}: the first add-back (after block {add[0]}) comes before the first read "
                              f"block ({read[0]}), so it would inject θ(0) = 0 and only cost memory; "
                              f"read a block ≤ {add[0]} or start add_blocks at ≥ {read[0]}")
        if read[-1] > add[-1]:
            raise ConfigError(f"{name}.read_blocks: block(s) {[b for b in read if b > add[-1]]} come after the last "
                              f"add-back ({add[-1]}), so what they read is never injected; "
                              f"allowed: read blocks ≤ {add[-1]}")
        self.read_blocks, self.add_blocks = read, add
        self.s0 = add[0]                     # blocks 0..s0 are pretrained-exact and run without a graph
        self._read_set, self._add_set = set(read), set(add)

        p = next(backbone.parameters())
        kw = {"device": p.device, "dtype": p.dtype}
        # A_i: r×D (Linear default init), B_i: D×r zeros, one pair per read block.
        # Reads of trunk blocks (i ≤ s₀) see constants: their A_i keeps its input as `tap_storage`.
        self.reads = nn.ModuleDict({str(i): LowRankRead(d, config.rank, config.tap_storage if i <= add[0] else "full",
                                                        **kw) for i in read})
        # One G∘θ_β shared by every add-back (DTL+: the single depthwise conv is shared).
        self.inject = Injection(d, config.beta, config.fusion, config.kernel, backbone.token_layout, **kw)
        if self.head is not None:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.trunk_cache: TrunkCache | None = config.make_trunk_cache()

    @property
    def feature_size(self) -> int:
        # Patch grids: the mean of the patch tokens (width d), not the backbone's own pooling (ViT: [CLS ‖ mean], 2d).
        bb = self.backbone
        return bb.hidden_size if bb.token_layout == "grid" else bb.feature_size

    def no_weight_decay(self) -> set[str]:
        """Parameter names the reference recipe trains without weight decay: only the head bias."""
        return {"head.bias"} if self.head is not None else set()

    # -- the frozen trunk -----------------------------------------------------------------------------
    def _trunk_mode(self):
        """Run the trunk in eval mode (unless trunk_dropout), restoring every module's flag afterwards."""
        return trunk_eval_mode(self.backbone, not self.method_config.trunk_dropout)

    def _trunk(self, batch):
        """Embedding and blocks 0..s₀ without a graph (or replayed from the trunk cache).

        Returns (y, taps, ctx): y = output of block s₀ before its injection (B×T×D), taps = [(i, x_i)] for
        the read blocks i ≤ s₀, ctx = the backbone's context for the later blocks.
        """
        cache = self.trunk_cache if self.training else None
        later = [i for i in self.read_blocks if 0 < i <= self.s0]
        with torch.no_grad(), self._trunk_mode():
            x0, ctx = self.backbone.embed(batch)                      # x_0: B×T×D
            mask = ctx.get("token_mask")
            keep = None if mask is None else mask.to(x0.dtype).unsqueeze(-1)   # B×T×1: 1 real, 0 padded
            if keep is not None:
                x0 = x0 * keep

            def compute():                                            # [x_i for i in later] + [block s₀'s output]
                # x_i, the input of block i, is the output of block i - 1.
                y, outs = self.backbone.forward_intermediates(x0, ctx, [i - 1 for i in later], stop=self.s0 + 1,
                                                              row_mask=keep)
                return outs + [y]

            stored = cached_trunk(cache, batch, mask, self.backbone.input_keys, compute, x0)
        taps = ([(0, x0)] if 0 in self._read_set else []) + list(zip(later, stored[:-1]))
        return stored[-1], taps, ctx

    # -- the whole forward ----------------------------------------------------------------------------
    def features(self, batch):
        y, taps, ctx = self._trunk(batch)
        h = None                                                     # side state, B×T×D
        for i, x_i in taps:                                          # x_i: constants, no graph
            r = self.reads[str(i)](x_i)
            h = r if h is None else h + r
        x = y + self.inject(h, ctx)                                  # s0 ∈ S: first injection
        for i in range(self.s0 + 1, self.backbone.num_layers):
            if i in self._read_set:
                h = h + self.reads[str(i)](x)                        # reads the block input
            x = self.backbone.run_block(i, x, ctx)
            if i in self._add_set:
                x = x + self.inject(h, ctx)                          # writes the block output
        return self._pool(x, ctx)

    def _pool(self, x, ctx):
        bb = self.backbone
        if bb.token_layout == "grid":
            z = bb.grid_tokens(x, ctx).mean(dim=1)                   # B×D: mean of patch tokens (CLS unused)
            return bb.finish(z, ctx)                                 # pretrained final LayerNorm after pooling
        return bb.pool(bb.finish(x, ctx), ctx)

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
    stages (Swin):    feats = pool(finish(x))                        # final LN on every token, then the mean

Choices the paper leaves open (documented here, tested in tests/methods/test_dtl.py):
- Trunk mode. The embedding and blocks 0..s₀ run in eval mode (no dropout / DropPath) during training too,
  so the trunk is a deterministic function of the input: this is what makes trunk caching exact, and the
  uncached path does the same so both give bit-identical results. The reference code keeps DropPath active
  in these blocks; `trunk_dropout=True` restores that (and cannot be combined with `cache_trunk`). Blocks
  after s₀ follow the module's train/eval mode as usual.
- Padding (BERT-like). The trunk's outputs (tap inputs x_i, i ≤ s₀, and block s₀'s output) have padded rows
  set to zero. Real tokens never attend to padded keys, so nothing a real token computes changes; it only
  makes the cached and uncached paths identical (the cache stores real rows only).
- Side state. h is accumulated over the whole stack (never reset) where the backbone keeps one width D
  throughout (ViT-like, BERT-like). A hierarchical backbone (several stages, `backbone.stage_starts`; Swin)
  gets a new state of its width at the start of every stage, as the reference Swin code: each read A_i, B_i
  has its block's width (`backbone.block_widths`), each stage with add-backs its own G (DTL+: one depthwise
  conv per stage over that stage's grid), and an add-back after the last block of a stage lands before the
  frozen stage transition (patch merging). Every read must reach an add-back of its own stage, so the trunk's
  reads all lie in the stage of s₀. Default reads: from the start of each such stage to its last add-back
  (Swin-B with add-backs 13..23: reads 4..23, the reference's taps, 90,112 parameters at r = 4). DTL+ makes
  convs only for the stages with add-backs (the reference also builds unused ones for the first two stages,
  which never receive a gradient).
- Pooling. ViT's reference pools the patch tokens first and then applies the final LayerNorm (timm's
  avg pool + fc_norm); Swin's applies it to every token and then takes the mean (its standard head). One
  stage over a patch grid follows the first, several stages the second (the backbone's own finish + pool).
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


def _stages(backbone) -> list[range]:
    """The block ranges of the backbone's stages (one range for one-width backbones)."""
    starts = list(backbone.stage_starts) + [backbone.num_layers]
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def _default_reads(stages, add) -> tuple[int, ...]:
    """Every block from the start of each stage that has add-backs up to its last add-back (one stage: 0..max S)."""
    return tuple(i for st in stages for i in range(st.start, max((a for a in add if a in st), default=-1) + 1))


def _check_block_sets(name, stages, read, add) -> None:
    """Per stage: its first add-back needs a read at or before it, and each read an add-back at or after it."""
    for k, st in enumerate(stages):
        where = "" if len(stages) == 1 else f" of stage {k} (blocks {st.start}..{st.stop - 1})"
        r, a = [i for i in read if i in st], [i for i in add if i in st]
        if a and (not r or r[0] > a[0]):
            first = r[0] if r else "none"
            raise ConfigError(f"{name}: the first add-back{where} (after block {a[0]}) comes before the first read "
                              f"block{where} ({first}), so it would inject θ(0) = 0 and only cost memory; "
                              f"read a block ≤ {a[0]}" + (f" or start add_blocks at ≥ {r[0]}" if r else ""))
        if r and (not a or r[-1] > a[-1]):
            if not a:
                raise ConfigError(f"{name}.read_blocks: block(s) {r} read stage {k} (blocks {st.start}..{st.stop - 1}), "
                                  "which has no add-back; the side state restarts at each stage, so what they read "
                                  "is never injected")
            raise ConfigError(f"{name}.read_blocks: block(s) {[b for b in r if b > a[-1]]} come after the last "
                              f"add-back{where} ({a[-1]}), so what they read is never injected; "
                              f"allowed: read blocks ≤ {a[-1]}")


class DTLModel(MemtuneModel):
    def __init__(self, backbone, config, num_labels=None):
        super().__init__(backbone, config, num_labels)
        n, widths = backbone.num_layers, backbone.block_widths
        name = config.name
        stages = _stages(backbone)
        add = (default_add_blocks(n) if config.add_blocks is None
               else take_indices(n, config.add_blocks, f"{name}.add_blocks", ConfigError))
        read = (_default_reads(stages, add) if config.read_blocks is None
                else take_indices(n, config.read_blocks, f"{name}.read_blocks", ConfigError))
        _check_block_sets(name, stages, read, add)
        self.read_blocks, self.add_blocks = read, add
        self.s0 = add[0]                     # blocks 0..s0 are pretrained-exact and run without a graph
        self._read_set, self._add_set = set(read), set(add)
        self._stage_starts = {st.start for st in stages[1:]}    # the side state restarts at these blocks
        self._trunk_stage = backbone.stage_of(self.s0)          # every trunk read lies in it (checked above)

        p = next(backbone.parameters())
        kw = {"device": p.device, "dtype": p.dtype}
        # A_i: r×D_i (Linear default init), B_i: D_i×r zeros, one pair per read block (D_i: its block's width).
        # Reads of trunk blocks (i ≤ s₀) see constants: their A_i keeps its input as `tap_storage`.
        self.reads = nn.ModuleDict({str(i): LowRankRead(widths[i], config.rank,
                                                        config.tap_storage if i <= add[0] else "full", **kw)
                                    for i in read})
        layout = backbone.token_layout
        if len(stages) == 1:
            # One G∘θ_β shared by every add-back (DTL+: the single depthwise conv is shared).
            self.inject = Injection(widths[0], config.beta, config.fusion, config.kernel, layout, **kw)
        else:
            # One per stage with add-backs, at its width (DTL+: one conv per stage, shared within it).
            self.stage_inject = nn.ModuleDict({
                str(k): Injection(widths[st.start], config.beta, config.fusion, config.kernel, layout, **kw)
                for k, st in enumerate(stages) if any(a in st for a in add)})
        if self.head is not None:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.trunk_cache: TrunkCache | None = config.make_trunk_cache()

    @property
    def _pools_patch_mean(self) -> bool:
        """One-stage patch grids (ViT-like) with readout="patch-mean": DTL pools the patch tokens itself (see the
        module docstring)."""
        bb = self.backbone
        return self.method_config.readout == "patch-mean" and bb.token_layout == "grid" and len(bb.stage_starts) == 1

    @property
    def feature_size(self) -> int:
        # One-stage patch grids: the mean of the patch tokens (width d), not the backbone's own pooling
        # (ViT: [CLS ‖ mean], 2d).
        return self.backbone.hidden_size if self._pools_patch_mean else self.backbone.feature_size

    def no_weight_decay(self) -> set[str]:
        """Parameter names the reference recipe trains without weight decay: only the head bias."""
        return {"head.bias"} if self.head is not None else set()

    # -- the frozen trunk -----------------------------------------------------------------------------
    def _trunk_mode(self):
        """Run the trunk in eval mode (unless trunk_dropout), restoring every module's flag afterwards."""
        return trunk_eval_mode(self.backbone, not self.method_config.trunk_dropout)

    def _trunk(self, batch):
        """Embedding and blocks 0..s₀ without a graph (or replayed from the trunk cache).

        Returns (y, taps, ctx): y = output of block s₀ before its injection (and before a stage transition
        after it), B×T×D, taps = [(i, x_i)] for the read blocks i ≤ s₀ (all in the stage of s₀), ctx = the
        backbone's context for the later blocks.
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
                # x_i, the input of block i, is the output of block i - 1 (stage transition included).
                bb = self.backbone
                x, outs = bb.forward_intermediates(x0, ctx, [i - 1 for i in later], stop=self.s0, row_mask=keep)
                y = bb.run_block_in_stage(self.s0, x, ctx)           # block s₀, before any stage transition
                return outs + [y if keep is None else y * keep]

            stored = cached_trunk(cache, batch, mask, self.backbone.input_keys, compute, self._cache_ref(x0, ctx))
        taps = ([(0, x0)] if 0 in self._read_set else []) + list(zip(later, stored[:-1]))
        return stored[-1], taps, ctx

    def _cache_ref(self, x0, ctx):
        """A B×T×· tensor of the trunk's taps' token count, device and dtype, for the trunk cache: the embedding
        output, or (trunk in a later stage, fewer tokens) an empty B×T_s×0 tensor."""
        if self._trunk_stage == 0:
            return x0
        rows, cols = self.backbone.stage_grid(self._trunk_stage, ctx)
        return x0.new_empty(x0.shape[0], rows * cols, 0)

    def _inject(self, i, h, ctx):
        """G(θ_β(h)) for an add-back after block i (B×T×D → B×T×D)."""
        if not hasattr(self, "stage_inject"):
            return self.inject(h, ctx)
        k = self.backbone.stage_of(i)
        return self.stage_inject[str(k)](h, ctx, grid=self.backbone.stage_grid(k, ctx))

    # -- the whole forward ----------------------------------------------------------------------------
    def features(self, batch):
        bb = self.backbone
        y, taps, ctx = self._trunk(batch)
        h = None                                                     # side state, B×T×D
        for i, x_i in taps:                                          # x_i: constants, no graph
            r = self.reads[str(i)](x_i)
            h = r if h is None else h + r
        x = bb.stage_transition(self.s0, y + self._inject(self.s0, h, ctx), ctx)   # s0 ∈ S: first injection
        for i in range(self.s0 + 1, bb.num_layers):
            if i in self._stage_starts:
                h = None                                             # a new stage: a new state of its width
            if i in self._read_set:
                r = self.reads[str(i)](x)                            # reads the block input
                h = r if h is None else h + r
            x = bb.run_block_in_stage(i, x, ctx)
            if i in self._add_set:
                x = x + self._inject(i, h, ctx)                      # writes the block output
            x = bb.stage_transition(i, x, ctx)
        return self._pool(x, ctx)

    def _pool(self, x, ctx):
        bb = self.backbone
        if self._pools_patch_mean:
            z = bb.grid_tokens(x, ctx).mean(dim=1)                   # B×D: mean of patch tokens (CLS unused)
            return bb.finish(z, ctx)                                 # pretrained final LayerNorm after pooling
        return bb.pool(bb.finish(x, ctx), ctx)

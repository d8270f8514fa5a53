"""Pruned-weight initialisation of the side network (docs/methods/lst.md §8).

Side block i starts from backbone block i, structurally pruned in one shot:

1. Embedding: keep the d' feature dims with the largest importance summed over the vocabulary (for a
   ViT patch embedding: over channels and pixels). That index set is P.
2. Per block, in order, a chain of steps (the backbone's `pruning_plan`):
   - `PruneVector`: 1-D parameters of the residual width (norms, layer scales) take P;
   - `PruneGroup`: input projections (q, k, v; or wi; or gate, up) drop their input columns ∉ P and keep the
     SAME top rows, ranked by ‖I_1[j] ⊙ I_2[j] ⊙ …‖₁ over the kept columns; the output projection takes
     those rows as its columns and keeps its own top rows by ‖I_o[j]‖₁, which become the new P.
     Biases follow their rows. A fused projection (`Fused`: q | k | v, gate | up, or GPT-NeoX's per-head
     [head, (q, k, v), d_kv]) counts as one input per part; the side copy keeps the same layout, part p's
     rows filled from the backbone part's kept rows.
3. The final norm takes P; the backbone's `side_shared_tables` (T5's 32×H relative-position table) are
   copied unpruned from backbone block 0 into the first kept side block (H is kept), and its
   `side_block_tables` (Swin's (2W−1)²×H table of every block) from each block into its own side block.
4. Staged backbones (Swin): after the last block of a stage, the patch merging joins 4 neighbour copies of the
   residual stream, so P is tiled over the 4 parts for its norm and its linear's columns; the linear keeps its
   own top rows, which are the next stage's P (`Pruner.merge`).

Choices (documented where the paper is silent; docs/methods/lst.md §8):
- Rows are ranked globally over H·d_kv ("per dimension"); kept rows stay in their original order and
  are reshaped into H heads of d_kv' rows, so a side head mixes rows of several backbone heads.
- The chain runs through every backbone block, dropped ones included (the paper prunes the whole
  model, then drops layers); only kept blocks are copied.
- Llama-like attention with grouped KV heads cannot share rows between q (H·d_kv) and k/v (KV·d_kv):
  there the same within-head dims J are kept in every head, scored by Σ_h ‖I_q[h,j] ⊙ I_k[g(h),j] ⊙
  I_v[g(h),j]‖₁, and chosen as rotary pairs (j, j + d_kv/2) so each kept dim keeps its rotation partner.
- Scores are computed in float64 (a product of three squared gradients underflows in float32).
- As in the code, residual indices are not consistent across x + f(x): an initialisation, not an exact
  sub-network.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...backbones import UnsupportedModel
from ...backbones.side_network import Fused, PruneGroup, PruneVector

Importance = Callable[[str, torch.Tensor], torch.Tensor]   # (backbone param name, param) → I, same shape


def plan(backbone, block: nn.Module) -> list[PruneVector | PruneGroup]:
    """The backbone's pruning chain for one of its blocks (`Backbone.pruning_plan`)."""
    try:
        return backbone.pruning_plan(block)
    except AttributeError as e:
        raise UnsupportedModel(f"lst: cannot prune a {type(block).__name__} block for the side network "
                               f"initialisation ({e}); use init='random'") from None


# -- selection --------------------------------------------------------------------------------------------------
def top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries, in increasing index order."""
    return torch.topk(score, k).indices.sort().values


def embedding_dims(I: torch.Tensor, k: int) -> torch.Tensor:
    """P from an embedding's importance: V×d (token table) or d×C×p×p (patch projection)."""
    I = I.double()
    score = I.sum(0) if I.dim() == 2 else I.flatten(1).sum(1)
    return top(score, k)


def shared_rows(Is: list[torch.Tensor], cols: torch.Tensor, k: int) -> torch.Tensor:
    """Rows kept in all input projections: top-k of ‖I_1[j, cols] ⊙ I_2[j, cols] ⊙ …‖₁."""
    prod = Is[0][:, cols].double()
    for I in Is[1:]:
        prod = prod * I[:, cols].double()
    return top(prod.abs().sum(1), k)


def head_rows(Iq, Ik, Iv, cols, heads: tuple[int, int, int], side_head_dim: int):
    """Grouped-KV selection: the same within-head dims J in every head, as rotary pairs.
    Returns (q rows: H·d_kv', k/v rows: KV·d_kv')."""
    H, KV, hd = heads
    g = H // KV
    q = Iq[:, cols].double().view(H, hd, -1)
    k = Ik[:, cols].double().view(KV, hd, -1).repeat_interleave(g, 0)
    v = Iv[:, cols].double().view(KV, hd, -1).repeat_interleave(g, 0)
    per_dim = (q * k * v).sum(dim=(0, 2))                       # hd
    half = hd // 2
    pairs = top(per_dim[:half] + per_dim[half:], side_head_dim // 2)
    J = torch.cat([pairs, pairs + half])                         # rotate_half pairs t with t + hd'/2
    q_rows = (torch.arange(H, device=J.device)[:, None] * hd + J).flatten()
    kv_rows = (torch.arange(KV, device=J.device)[:, None] * hd + J).flatten()
    return q_rows, kv_rows


# -- projections: nn.Linear (weight out×in) or transformers' Conv1D (weight in×out) ----------------------------
def transposed(m: nn.Module) -> bool:
    """True for a projection storing its weight in×out (Conv1D: y = x·W + b)."""
    return isinstance(m, Conv1D)


def out_major(m: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """A weight-shaped tensor of projection m (its weight, or the weight's importance) as out×in."""
    return t.t() if transposed(m) else t


def out_size(m: nn.Module) -> int:
    return out_major(m, m.weight).shape[0]


def in_size(m: nn.Module) -> int:
    return out_major(m, m.weight).shape[1]


def input_parts(block: nn.Module, inputs) -> list[tuple[nn.Module, torch.Tensor | None]]:
    """The logical input projections of a PruneGroup in `block`: (module, the part's rows in it; None: all)."""
    parts = []
    for entry in inputs:
        if isinstance(entry, Fused):
            m = block.get_submodule(entry.path)
            parts += [(m, rows) for rows in entry.part_rows(out_size(m), m.weight.device)]
        else:
            parts.append((block.get_submodule(entry), None))
    return parts


# -- applying a plan ------------------------------------------------------------------------------------------
class Pruner:
    """Copies `W[rows][:, cols]` from backbone blocks into side blocks and records every index set.

    `records[side_param_name] = (backbone_param_name, rows, cols)` with names relative to the wrapped
    model, so `model.get_parameter(side) == model.get_parameter(source)[rows][:, cols]` (cols None for
    1-D parameters, both None for a full copy). Rows and cols index the stored tensor: for a Conv1D
    weight (in×out) rows are input dims and cols output rows.
    """

    def __init__(self, model: nn.Module, importance: Importance):
        self.names = {id(p): n for n, p in model.named_parameters()}   # tied weights: first name
        self.importance = importance
        self.records: dict[str, tuple[str, torch.Tensor | None, torch.Tensor | None]] = {}

    def imp(self, p: torch.Tensor) -> torch.Tensor:
        return self.importance(self.names[id(p)], p)

    def part_imp(self, m: nn.Module, rows: torch.Tensor | None) -> torch.Tensor:
        """Importance of one logical projection (`input_parts`), out×in."""
        I = out_major(m, self.imp(m.weight))
        return I if rows is None else I[rows]

    @torch.no_grad()
    def copy(self, dst: torch.Tensor, src: torch.Tensor, rows=None, cols=None) -> None:
        w = src
        if rows is not None:
            w = w[rows]
        if cols is not None:
            w = w[:, cols]
        dst.copy_(w)
        self.records[self.names[id(dst)]] = (self.names[id(src)], rows, cols)

    def linear(self, dst: nn.Module | None, src: nn.Module, rows, cols) -> None:
        """dst ← src's output rows `rows` and input columns `cols` (bias: its rows)."""
        if dst is None:
            return
        if transposed(src):
            self.copy(dst.weight, src.weight, cols, rows)
        else:
            self.copy(dst.weight, src.weight, rows, cols)
        if src.bias is not None and dst.bias is not None:
            self.copy(dst.bias, src.bias, rows)

    def inputs(self, step: PruneGroup, bb: nn.Module, side: nn.Module | None, kept: list[torch.Tensor],
               P: torch.Tensor) -> None:
        """Copy every input projection of `step` into the side block; kept[p]: the rows kept of logical part p
        (indices into that part). A fused projection's side copy has the backbone's layout at side width."""
        p = 0
        for entry in step.inputs:
            path = entry.path if isinstance(entry, Fused) else entry
            src = bb.get_submodule(path)
            dst = side.get_submodule(path) if side is not None else None
            if not isinstance(entry, Fused):
                self.linear(dst, src, kept[p], P)
                p += 1
                continue
            if dst is None:
                p += len(entry.shares)
                continue
            src_parts = entry.part_rows(out_size(src), P.device)
            dst_parts = entry.part_rows(out_size(dst), P.device)
            rows = torch.empty(out_size(dst), dtype=torch.long, device=P.device)
            for src_rows, dst_rows in zip(src_parts, dst_parts):
                rows[dst_rows] = src_rows[kept[p]]
                p += 1
            self.linear(dst, src, rows, P)

    def stack(self, backbone, blocks, side_blocks: dict[int, nn.Module], P: torch.Tensor,
              templates: dict[int, nn.Module] | None = None, transitions: dict | None = None) -> torch.Tensor:
        """Run the chain through every block of a backbone stack; copy into the side blocks that exist.
        Returns P.

        templates[i]: a module with the shapes side block i would have, for dropped blocks (default: the first
        side block; one-width stacks' side blocks share one shape). transitions[i] = (backbone transition,
        side transition, PruneMerge): the stage transition after block i, pruned in the chain (Swin)."""
        first = next(iter(side_blocks.values()))
        templates, transitions = templates or {}, transitions or {}
        for i, bb in enumerate(blocks):
            side = side_blocks.get(i)
            template = side if side is not None else templates.get(i, first)
            for step in plan(backbone, bb):
                if isinstance(step, PruneVector):
                    for n in step.params:
                        if side is not None:
                            self.copy(side.get_parameter(n), bb.get_parameter(n), P)
                    continue
                Is = [self.part_imp(m, rows) for m, rows in input_parts(bb, step.inputs)]
                out = bb.get_submodule(step.output)
                side_out = template.get_submodule(step.output)
                if step.heads is not None:
                    side_hd = in_size(side_out) // step.heads[0]
                    q_rows, kv_rows = head_rows(*Is, P, step.heads, side_hd)
                    kept = [q_rows, kv_rows, kv_rows]
                    mid = q_rows
                    J = q_rows[:side_hd]                      # head 0's kept rows are J itself
                    for n in step.head_norms:
                        for pn, p in bb.get_submodule(n).named_parameters(recurse=False):
                            if side is not None:
                                self.copy(side.get_parameter(f"{n}.{pn}"), p, J)
                else:
                    m, rows = input_parts(template, step.inputs)[0]
                    mid = shared_rows(Is, P, out_size(m) if rows is None else rows.numel())
                    kept = [mid] * len(Is)
                self.inputs(step, bb, side, kept, P)
                P_new = top(out_major(out, self.imp(out.weight))[:, mid].double().sum(1), out_size(side_out))
                self.linear(side.get_submodule(step.output) if side is not None else None, out, P_new, mid)
                P = P_new
            if i in transitions:
                P = self.merge(*transitions[i], P)
        return P

    def merge(self, src: nn.Module, dst: nn.Module, step, P: torch.Tensor) -> torch.Tensor:
        """A patch merging (`PruneMerge` step): its norm takes P tiled over the concatenated parts, its linear
        those dims as columns and its own top rows (by ‖I[j, cols]‖₁), which are returned as the next P."""
        norm, linear = src.get_submodule(step.norm), src.get_submodule(step.linear)
        width = in_size(linear) // step.parts                          # C: one part's width
        cols = torch.cat([k * width + P for k in range(step.parts)])   # 4·|P|, in the side's part order
        for n, p in norm.named_parameters(recurse=False):
            self.copy(dst.get_submodule(step.norm).get_parameter(n), p, cols)
        side_linear = dst.get_submodule(step.linear)
        rows = top(out_major(linear, self.imp(linear.weight))[:, cols].double().sum(1), out_size(side_linear))
        self.linear(side_linear, linear, rows, cols)
        return rows

    def vector(self, dst_module: nn.Module, src_module: nn.Module, P: torch.Tensor) -> None:
        """Final norm ← P (weight and bias where present)."""
        for n, p in src_module.named_parameters(recurse=False):
            self.copy(dst_module.get_parameter(n), p, P)

"""The adapters and the two-stream coupling of one MEFT layer: its forward, inverse and backward.

Streams x¹, x² (each B×T×d) enter layer n and leave as

    y¹ = λ·x¹ + F_n(x²)          inverse:  x² = (y² − G_n(y¹)) / β
    y² = β·x² + G_n(y¹)                     x¹ = (y¹ − F_n(x²)) / λ

stored as (y², y¹) when the variant swaps (MEFT1/2), else (y¹, y²). F and G are built from one stack's
sub-layer calls (`StackCalls`, residual and norms included) and adapters: the (encoder or single) stack's
`attention_sublayer` / `ffn_sublayer`, or an encoder-decoder's decoder, whose "attention" part is its causal
self-attention followed by the cross-attention to the memory (the finished encoder output, read from ctx).
Where F or G reads the memory, the memory carries a gradient back to the encoder's adapters: it is an input
of the reversible Function (`grad_inputs`), and the backward's vector-Jacobian products include it.

Adapter placement (docs/methods/meft.md §4, stated for post-LN BERT; the pre-norm placement is this library's choice):
* FFN adapter (all variants), in parallel to the FFN branch: its input is the branch's input (BERT: the
  sub-layer input a, so out = LN₂(Dropout(FFN(a)) + A(a) + a); ViT/Llama: the normalised LN₂(a)), its
  output joins the branch before the residual (DINOv2: before the layer scale, so it is scaled like the
  branch beside it; measured on DINOv2-S this halves MEFT2's feature deviation at init).
* attention adapter (MEFT3), in series on the attention branch: u ← u + A(u) before the residual (decoder:
  on the cross-attention branch, the last attention branch of F, so F ends as the encoder's F does).
* reversible adapter (MEFT1: G; MEFT2: F) on the raw stream, optionally after a LayerNorm.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN


class Bottleneck(nn.Module):
    """A(x) = W_up·Dropout(φ(W_down·x + b_down)) + b_up, no internal residual (paper, §4).

    Weights ~ N(0, std²) and biases 0 (paper, Fig. 4): small but not zero, so the PLM's function is kept
    only approximately at init.
    """

    def __init__(self, d: int, b: int, act: str, dropout: float, std: float, norm_eps: float | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=norm_eps) if norm_eps is not None else None
        self.down = nn.Linear(d, b)
        self.up = nn.Linear(b, d)
        self.act = ACT2FN[act] if isinstance(act, str) else act
        self.dropout = nn.Dropout(dropout)
        for lin in (self.down, self.up):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)

    def forward(self, x):                                     # B×T×d → B×T×d
        if self.norm is not None:
            x = self.norm(x)
        return self.up(self.dropout(self.act(self.down(x))))


class LayerAdapters(nn.Module):
    """The two adapters of one layer: `ffn` (all variants, parallel to the FFN) and `attn` (MEFT3, in
    series after the attention output) or `rev` (MEFT1: G; MEFT2: F)."""

    def __init__(self, variant: int, d: int, b: int, act: str, dropout: float, std: float, norm_eps=None):
        super().__init__()
        self.ffn = Bottleneck(d, b, act, dropout, std)
        if variant == 3:
            self.attn = Bottleneck(d, b, act, dropout, std)
        else:
            self.rev = Bottleneck(d, b, act, dropout, std, norm_eps)


class RngState:
    """The CPU (and CUDA device) generator state right before one F or G call, for exact dropout replay.

    Replaying restores the state inside `fork_rng`, so the global generators are left as they were: the
    backward neither consumes nor perturbs the random stream of the training run.
    """

    __slots__ = ("cpu", "device", "cuda")

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.device is not None else None

    @contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=[self.device] if self.device is not None else []):
            torch.set_rng_state(self.cpu)
            if self.device is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _replay(rng: RngState | None):
    return rng.replay() if rng is not None else nullcontext()


@dataclass(frozen=True)
class StackCalls:
    """The sub-layer calls of one stack, each (n, x, ctx, branch_hook=None) → B×T×d, residual included.

    attention  the attention part (decoder: self-attention, then cross-attention to ctx["memory"]; a
               branch hook edits the last branch)
    ffn        the feed-forward sub-layer
    grad_key   the ctx entry F and G read that may carry a gradient (the decoder's memory), or None
    """
    attention: Callable
    ffn: Callable
    grad_key: str | None = None

    @classmethod
    def of(cls, backbone, decoder: bool = False) -> "StackCalls":
        if not decoder:
            return cls(backbone.attention_sublayer, backbone.ffn_sublayer)

        def attention(n, x, ctx, branch_hook=None):
            a = backbone.decoder_attention_sublayer(n, x, ctx)
            return backbone.decoder_cross_sublayer(n, a, ctx, branch_hook)

        return cls(attention, backbone.decoder_ffn_sublayer, "memory")


class TwoStream:
    """The coupling of every adapted layer of one stack for one batch (built per forward: it holds the
    batch's ctx). `decoder` selects an encoder-decoder's decoder stack and its adapters.

    `stream_dtype` is the dtype of x¹, x² and of the coupling arithmetic; F and G run in `compute_dtype`
    (the backbone's hidden-state dtype), their inputs cast down and outputs cast up.
    """

    def __init__(self, model, ctx, compute_dtype: torch.dtype, stream_dtype: torch.dtype, decoder: bool = False):
        self.backbone = model.backbone
        self.decoder = decoder
        self.calls = StackCalls.of(model.backbone, decoder)
        self.adapters = model.decoder_adapters if decoder else model.adapters
        self.first = 0 if decoder else model.first_adapted      # backbone index of adapters[0]
        self.variant = model.method_config.variant
        self.lam, self.beta = model.method_config.factors
        self.swap = model.method_config.swap
        self.ctx = ctx
        self.compute_dtype = compute_dtype
        self.stream_dtype = stream_dtype
        self.record_rng = model.training                # randomness (dropout, drop path) only in training
        # "difference" coupling: the PLM sub-networks subtract factor·input, so their skip path carries
        # (1 − factor)·input and y = factor·(x_other − x_in) + sub-layer(x_in) (see MEFTConfig.coupling).
        diff = model.coupling == "difference"
        self.f_shift = self.lam if diff and self.variant in (1, 3) else 0.0
        self.g_shift = self.beta if diff and self.variant in (2, 3) else 0.0

    # -- F and G -------------------------------------------------------------------------------
    def _plm_layer(self, n, x, ad):
        """The whole PLM layer with the FFN adapter in parallel to its FFN branch."""
        a = self.calls.attention(n, x, self.ctx)
        return self.calls.ffn(n, a, self.ctx, branch_hook=lambda inp, u: u + ad.ffn(inp))

    def _F(self, n, x):
        ad = self.adapters[n - self.first]
        if self.variant == 1:
            return self._plm_layer(n, x, ad)
        if self.variant == 2:
            return ad.rev(x)
        # MEFT3: u = Dropout(W_o·ctx); u ← u + A_attn(u); then residual and norm (docs/methods/meft.md §4).
        return self.calls.attention(n, x, self.ctx, branch_hook=lambda inp, u: u + ad.attn(u))

    def _G(self, n, y):
        ad = self.adapters[n - self.first]
        if self.variant == 1:
            return ad.rev(y)
        if self.variant == 2:
            return self._plm_layer(n, y, ad)
        return self.calls.ffn(n, y, self.ctx, branch_hook=lambda inp, u: u + ad.ffn(inp))

    # -- the memory (decoder): a ctx tensor F/G read that carries a gradient ---------------------------
    def grad_inputs(self) -> list[torch.Tensor]:
        """The ctx tensors F and G read that require grad (the decoder's memory B×Ts×d; else none): inputs
        of the reversible Function, whose gradients its backward returns."""
        t = self.ctx.get(self.calls.grad_key) if self.calls.grad_key else None
        return [t] if torch.is_tensor(t) and t.requires_grad else []

    @contextmanager
    def reading(self, tensors: list[torch.Tensor]):
        """F and G read `tensors` (leaves standing in for `grad_inputs()`) while the context is active."""
        if not tensors:
            yield
            return
        key = self.calls.grad_key
        kept = self.ctx[key]
        self.ctx[key] = tensors[0]
        try:
            yield
        finally:
            self.ctx[key] = kept

    def F(self, n, x2):                                   # B×T×d (stream dtype) → B×T×d (stream dtype)
        out = self._F(n, x2.to(self.compute_dtype)).to(self.stream_dtype)
        return out - self.f_shift * x2 if self.f_shift else out

    def G(self, n, y1):
        out = self._G(n, y1.to(self.compute_dtype)).to(self.stream_dtype)
        return out - self.g_shift * y1 if self.g_shift else out

    def params_F(self, n) -> list[torch.Tensor]:
        ad = self.adapters[n - self.first]
        mod = ad.ffn if self.variant == 1 else ad.rev if self.variant == 2 else ad.attn
        return [p for p in mod.parameters() if p.requires_grad]

    def params_G(self, n) -> list[torch.Tensor]:
        ad = self.adapters[n - self.first]
        mod = ad.rev if self.variant == 1 else ad.ffn
        return [p for p in mod.parameters() if p.requires_grad]

    # -- one layer -----------------------------------------------------------------------------
    def forward_layer(self, n, x1, x2, rngs: list | None = None):
        """(x¹, x²) → next stored pair. With `rngs`, append the generator states used by F and G."""
        rf = RngState(x2.device) if rngs is not None and self.record_rng else None
        y1 = self.lam * x1 + self.F(n, x2)
        rg = RngState(y1.device) if rngs is not None and self.record_rng else None
        y2 = self.beta * x2 + self.G(n, y1)
        if rngs is not None:
            rngs.append((rf, rg))
        return (y2, y1) if self.swap else (y1, y2)

    def _unswap(self, o1, o2):
        return (o2, o1) if self.swap else (o1, o2)

    @torch.no_grad()
    def inverse_layer(self, n, o1, o2, rng):
        """Stored output pair of layer n → its input pair (no gradients), replaying F's and G's dropout."""
        y1, y2 = self._unswap(o1, o2)
        rf, rg = rng
        with _replay(rg):
            x2 = (y2 - self.G(n, y1)) / self.beta
        with _replay(rf):
            x1 = (y1 - self.F(n, x2)) / self.lam
        return x1, x2

    def backward_layer(self, n, o1, o2, go1, go2, rng, extras: list[torch.Tensor] = ()):
        """Inverse and vector-Jacobian product of layer n (docs/methods/meft.md §6, steps 1–5).

        o1, o2: its stored output pair; go1, go2: ∂L/∂(o1, o2); extras: leaves F and G read in place of
        `grad_inputs()` (under `reading`), e.g. the decoder's memory. Returns the input pair, ∂L/∂(input
        pair), the gradients of (params_F + params_G) and those of the extras (J_Gᵀg² + J_Fᵀḡ¹ with respect
        to them). Only one sub-network's graph is alive at a time.
        """
        y1, y2 = self._unswap(o1, o2)
        g1, g2 = self._unswap(go1, go2)
        rf, rg = rng
        pf, pg = self.params_F(n), self.params_G(n)
        extras = list(extras)
        # 1. u = G(y¹) with grad: a¹ = J_Gᵀ g², and G's parameter (and memory) gradients.
        with torch.enable_grad(), _replay(rg):
            y1 = y1.detach().requires_grad_(True)
            u = self.G(n, y1)
            a1, *rest = torch.autograd.grad(u, [y1, *pg, *extras], g2, allow_unused=True)
            grad_g, extra_g = rest[:len(pg)], rest[len(pg):]
        # 2. x² = (y² − u)/β; ḡ¹ = g¹ + a¹ (a¹ is None where G ignores y¹: never for a real layer).
        with torch.no_grad():
            x2 = (y2 - u.detach()) / self.beta
            gbar1 = g1 if a1 is None else g1 + a1
        del u
        # 3. v = F(x²) with grad: a² = J_Fᵀ ḡ¹, and F's parameter (and memory) gradients.
        with torch.enable_grad(), _replay(rf):
            x2 = x2.requires_grad_(True)
            v = self.F(n, x2)
            a2, *rest = torch.autograd.grad(v, [x2, *pf, *extras], gbar1, allow_unused=True)
            grad_f, extra_f = rest[:len(pf)], rest[len(pf):]
        # 4.–5. x¹ = (y¹ − v)/λ; ∂L/∂x¹ = λ·ḡ¹, ∂L/∂x² = β·g² + a².
        with torch.no_grad():
            x1 = (y1.detach() - v.detach()) / self.lam
            gx1 = self.lam * gbar1
            gx2 = self.beta * g2 if a2 is None else self.beta * g2 + a2
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(pf + pg, grad_f + grad_g)]
        extra_grads = [_sum_or_zeros(t, a, b) for t, a, b in zip(extras, extra_g, extra_f)]
        return (x1, x2.detach()), (gx1, gx2), grads, extra_grads


def _sum_or_zeros(t: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """a + b where either may be None (an input G or F does not read); zeros shaped like t if both are."""
    if a is None and b is None:
        return torch.zeros_like(t)
    return b if a is None else a if b is None else a + b

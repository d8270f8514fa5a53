"""QST options (Zhang et al., "Quantized Side Tuning: Fast and Memory-Efficient Tuning of Quantized Large
Language Models", ACL 2024). Data and validation only; the model is in `model.py`."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...backbones import families_with
from ..base import MethodConfig, check
from ..common.side_options import SideNetworkOptions
from ..common.trunk_cache import TrunkCacheOptions

DOWNSAMPLES = ("adapter", "linear", "lora", "avgpool", "maxpool")
POOLS = ("avgpool", "maxpool")
GATES = ("vector", "scalar")
MIXES = ("paper", "sigmoid")
DEFAULT_R = 16


@dataclass
class QSTFields:
    """QST's own options (documented in QSTConfig), listed before the shared side-network ones."""
    r: int | None = None
    k: int = 16
    downsample: str = "adapter"
    gate: str = "vector"
    mix: str = "paper"
    lambda_init: float = 1.0


@dataclass
class QSTConfig(SideNetworkOptions, QSTFields, TrunkCacheOptions, MethodConfig):
    """Quantized Side Tuning: a frozen (e.g. 4-bit) backbone run without autograd, read at every layer by a
    side network of width d/r, whose output is mixed with the backbone's last hidden state.

    r            reduction factor: side width d' = d/r, FFN width ⌊d_ff/r⌋, heads (and KV heads) kept, so
                 d/r must be a whole number divisible by the head count (Llama-like: with an even head
                 width, for rotary positions; Swin: every stage's C_s/r, divisible by that stage's heads).
                 None (default) means the paper's 16 where it fits; a backbone too narrow for 16 gets the
                 largest r below 16 that fits, with a warning. An explicit r that does not fit is refused
                 with the values that do.
    k            rank of the adapter/LoRA downsample (paper and code: 16).
    downsample   how each backbone layer's output (B×T×d) is read into the side width (B×T×d'):
                   "adapter"  LN(W_B·swish(W_A·x)), W_A: k×d, W_B: d'×k, no biases (the paper's best, default)
                   "lora"     LN(W_B·W_A·x), the same without the activation
                   "linear"   W·x, W: d'×d, no bias
                   "avgpool"  mean over r contiguous channels ("gradient-free": no parameters, nothing
                              of the backbone is kept for backward)
                   "maxpool"  max over r contiguous channels (no parameters)
    gate         "vector": z_i ∈ ℝ^{d'} starting at 0.5 (released code, β = σ(0.5) = 0.62);
                 "scalar": one γ_i starting at 0 (paper, β = 0.5). s ← (1−β)⊙D_i(h_i) + β⊙s.
    mix          output o from h_N (backbone, final-normed) and u = Up(Norm_side(s_N)):
                   "paper"    o = α⊙h_N + (1−α)⊙u, α ∈ ℝ^d starting at 1: the model starts exactly at
                              the pretrained one (default);
                   "sigmoid"  o = σ(λ)⊙h_N + (1−σ(λ))⊙u, λ ∈ ℝ^d starting at `lambda_init`
                              (released LLaMA code: 1, so the start is 0.73·h_N plus 0.27·u).
                 α or λ is a trained parameter in both forms.
    lambda_init  the start of λ for mix="sigmoid".
    attention    the side blocks' attention kernel: "sdpa" (fused: no B·H·T² maps are stored for
                 backward, and H is not reduced by r, so at long T those maps would dominate), "eager"
                 (softmax maps stored, as the released code), or "auto" (default): sdpa where the side
                 block class has a fused path (bert, vit, llama), eager for MPNet, whose attention has none.
    attention_dropout
                 dropout on the side attention probabilities. None (default): 0 with fused attention (a
                 dropout > 0 makes PyTorch fall back to the map-storing math kernel), the backbone's own
                 rate with eager attention.
    side_heads   head count of the side blocks (None: the backbone's H, as the paper). d/r must be
                 divisible by it; fewer heads give wider side heads (the paper's are d/(rH) = 8 wide at
                 LLaMA-2-7B, and 1 wide on a 4-head d=64 model at r=16). bert (not MPNet), vit and
                 Llama-like decoders (KV heads H'·KV/H where that is whole, else H'). The side attention's
                 score and softmax work is B·H'·T² per block whatever the head width, so at long T on a CPU
                 the kept H costs about what the backbone's attention does (benchmarks/RESULTS.md, SmolLM2).
    tap_storage  how the downsample's first matrix (adapter/LoRA W_A, or the linear W) keeps its frozen
                 input, a backbone hidden state B×T×d, for its weight gradient: "full", "bf16" (half the
                 bytes) or "int8" (a quarter, plus a scale per token); the forward is unchanged
                 (methods/common/compact_linear.py). The pooling downsamples keep nothing, so only
                 "full" is allowed with them. With side_checkpointing each checkpointed side step keeps
                 its full hidden state for the recompute, so only D_0's read of the embedding is compact.
    trunk_dropout
                 run the frozen backbone in the module's train mode (its dropout active, as the released
                 code under the HF Trainer). False runs it in eval mode: deterministic, which cache_trunk
                 needs on a backbone with dropout (BERT-like: 0.1; Llama and ViT have none).
    cache_*      the trunk cache (methods/common/trunk_cache.py): the N backbone block outputs computed
                 once per training example and replayed in later epochs (single-stack backbones: bert,
                 vit, llama, ...; refused on encoder-decoders and on Swin, whose stages change width).
    side_checkpointing
                 recompute each side step (gate fusion, downsample, side block) in backward instead of
                 keeping its activations. This is not the `gc` technique: the backbone is never on the
                 backprop path, so only the side network has activations to recompute. A pooling
                 downsample (no weight) runs before the checkpoint, which then keeps the pooled tap
                 (B×T×d/r) instead of the block output (B×T×d): with downsample="avgpool" the side
                 network keeps about 2·d/r values per token and layer (SmolLM2 8 × 1024 with +chunked_ce:
                 0.68 × QLoRA + checkpointing's planned peak, benchmarks/RESULTS.md).

    Encoder-decoders (t5, bart, mbart; qst/encoder_decoder.py): a side encoder over the encoder blocks and a
    side decoder over the decoder blocks, each with its own downsamples and gates; the side decoder
    cross-attends to the side encoder's output, and the mix (and Up) sits on the decoder output.

    Learning rate: `default_lr` = 2e-4 is the paper's value for decoders (Table 9: LLaMA-2-7B/13B and
    OPT up to 6.7B; Table 8: GLUE on OPT). Small encoders (BERT/ViT families, d of a few hundred) train a
    new classifier on pooled features plus a side network a few dozen channels wide, for a few epochs;
    2e-4 moves those too slowly, so `lr_for("bert")` / `lr_for("vit")` give 1e-3: between LoRA's and
    SHERL's 5e-4 and LST's 3e-3, lower than LST's because QST starts at the pretrained model (the side
    path enters through α) rather than from a side network that must first learn to carry the signal.
    `memtune train` asks `lr_for(family)` when `--lr` is not given (1e-3 for every family without a
    "decoder" capability).
    """

    name = "qst"
    requires = ("side_network",)          # hierarchical (Swin) backbones get a staged side network (model.py)
    default_lr = 2e-4
    encoder_lr = 1e-3
    side_checkpointing: bool = False

    def validate(self):
        check(self.r is None or self.r >= 1,
              f"qst.r must be a positive integer (the side network is d/r wide) or none, got {self.r}")
        check(self.k >= 1, f"qst.k (the adapter rank) must be a positive integer, got {self.k}")
        check(self.downsample in DOWNSAMPLES,
              f"qst.downsample must be one of {', '.join(DOWNSAMPLES)}; got {self.downsample!r}")
        check(self.gate in GATES, f"qst.gate must be one of {', '.join(GATES)}; got {self.gate!r}")
        check(self.mix in MIXES, f"qst.mix must be one of {', '.join(MIXES)}; got {self.mix!r}")
        check(math.isfinite(self.lambda_init), f"qst.lambda_init must be a finite number, got {self.lambda_init}")
        self.validate_side_options()
        check(self.tap_storage == "full" or self.downsample not in POOLS,
              f"qst.tap_storage={self.tap_storage} has no effect with downsample={self.downsample} (a pooling "
              f"downsample keeps no backbone tensor for backward); use tap_storage=full")
        self.validate_trunk_cache()

    @classmethod
    def lr_for(cls, family: str) -> float:
        """The default learning rate for a backbone family (see the class docstring): `default_lr` for decoders."""
        return cls.default_lr if family in families_with(("decoder",)) else cls.encoder_lr

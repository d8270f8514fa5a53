"""LST options (Sung, Cho & Bansal, NeurIPS 2022: "LST: Ladder Side-Tuning for Parameter and Memory
Efficient Transfer Learning")."""
from __future__ import annotations

from dataclasses import dataclass

from ..base import MethodConfig, check
from ..common.side_options import SideNetworkOptions
from ..common.trunk_cache import TrunkCacheOptions

INITS = ("random", "magnitude", "fisher")


@dataclass
class LSTFields:
    """LST's own options (documented in LSTConfig), listed before the shared side-network ones."""
    r: int = 8
    gate_temperature: float = 0.1
    keep_layers: tuple[int, ...] | None = None
    init: str = "magnitude"
    fisher_samples: int = 1024
    dropout: float | None = None


@dataclass
class LSTConfig(SideNetworkOptions, LSTFields, TrunkCacheOptions, MethodConfig):
    """Ladder Side-Tuning: a frozen backbone and a narrow side network of the same block type.

    r                 reduction factor: side width d' = d/r, FFN width d_ff/r, per-head width d_kv/r,
                      head count unchanged (paper: 8 for T5/BART on GLUE, 4 for vision-language).
                      Swin: d'_s = C_s/r per stage with each stage's heads, and a trainable side patch
                      merging between stages (docs/methods/lst.md "Swin").
    gate_temperature  T_g in mu_i = sigmoid(alpha_i / T_g); alpha_i starts at 0, so mu_i = 0.5.
    keep_layers       backbone layers (0-indexed) that get a ladder and a side block; None keeps all.
                      The paper's T5-base run keeps 1,2,3,5,6,7,9,10,11. For T5 the same set is used
                      by the encoder and the decoder stack.
    init              how the side blocks start:
                        "magnitude"  structurally pruned backbone blocks, importance |theta| (default:
                                     needs no data, so `memtune.wrap` alone gives the pruned start);
                        "fisher"     the paper scripts' default, importance = empirical diagonal Fisher.
                                     It needs labelled training examples, which `wrap` does not see:
                                     the model starts from the magnitude pruning and
                                     `model.initialize_from_fisher(batches)` redoes the pruning with
                                     Fisher importance (`fisher_samples` single-example backward
                                     passes through the full pretrained model). Until then
                                     `model.data_init_pending` is True;
                        "random"     the family's own weight initialisation, no pruning (the paper's
                                     ablation reports it as worse).
    fisher_samples    number of single-example backward passes for the Fisher importance (paper: 1024).
    dropout           dropout of the side path (W0 input, the input of W_up) and of the side blocks.
                      None (default): the backbone's own residual dropout (T5 and BERT-like 0.1 as the
                      paper's T5 runs; ViT/DINOv2 and Llama 0, so a backbone trained without dropout does
                      not get a side network that drops 10 % of its features).
    attention         the side blocks' attention kernel: "sdpa" (fused attention: no B·H·T² maps are
                      stored for backward; on the CPU PyTorch's flash kernel runs when the attention-
                      probability dropout is 0), "eager" (as the paper measured: softmax output, dropout
                      mask and dropped map are stored, and since H is kept they do not shrink with r) or
                      "auto" (default: sdpa where the family's side block has it, i.e. bert, vit, llama;
                      eager for T5 and MPNet, whose attention classes have no fused path, and for Swin,
                      whose trainable position bias enters the kernel as a mask).
    attention_dropout dropout on the side attention probabilities. None (default): 0 when the side
                      attention is fused (a dropout > 0 makes PyTorch fall back to the map-storing math
                      kernel), `dropout` when eager (as the paper).
    side_heads        head count of the side blocks (None: the backbone's H, as the paper). Fewer heads
                      for a narrow backbone give wider side heads; bert (not MPNet) and vit only (on
                      Llama-like decoders the pruned init maps heads one to one; QST takes side_heads there).
    tap_storage       how the ladders keep their frozen input (a backbone tap) for the weight gradient:
                      "full", "bf16" (default) or "int8" (per-token absmax scale); see
                      methods/common/compact_linear. bf16 halves the saved taps; on MiniLM + Rotten Tomatoes
                      (3,000 examples, one epoch) it gave the same test accuracy as "full" (0.749 both) with
                      the activation peak down from 156 to 135 MiB (benchmarks/RESULTS.md).
    trunk_dropout     run the frozen backbone in the module's train mode (its dropout active), as the
                      paper. False runs it in eval mode: deterministic, which cache_trunk needs when the
                      backbone has dropout.
    cache_*           the trunk cache (methods/common/trunk_cache.py): backbone taps computed once per
                      training example and replayed in later epochs (bert, vit, llama; not Swin).
    """

    name = "lst"
    requires = ("side_network",)
    default_lr = 3e-3          # paper scripts (T5 on GLUE); side methods want ~10x full fine-tuning's
    tap_storage: str = "bf16"

    def validate(self):
        check(self.r >= 1, f"lst.r must be a positive integer (the side network is d/r wide), got {self.r}")
        check(self.gate_temperature > 0, f"lst.gate_temperature must be > 0, got {self.gate_temperature}")
        check(self.init in INITS, f"lst.init must be one of {', '.join(INITS)}; got {self.init!r}")
        check(self.fisher_samples >= 1, f"lst.fisher_samples must be >= 1, got {self.fisher_samples}")
        check(self.dropout is None or 0 <= self.dropout < 1,
              f"lst.dropout must be in [0, 1) or None (the backbone's own), got {self.dropout}")
        self.validate_side_options()
        self.validate_trunk_cache()
        if self.keep_layers is not None:
            keep = self.keep_layers
            check(len(keep) > 0, "lst.keep_layers must name at least one layer (or be None for all layers)")
            check(all(i >= 0 for i in keep), f"lst.keep_layers must be 0-indexed layer numbers >= 0, got {keep}")
            check(len(set(keep)) == len(keep), f"lst.keep_layers has duplicates: {keep}")
            self.keep_layers = tuple(sorted(keep))

    def side_dropout(self, backbone) -> float:
        """`dropout`, or the backbone's residual dropout where it is None."""
        return backbone.hidden_dropout if self.dropout is None else self.dropout

    def kept(self, num_layers: int) -> tuple[int, ...]:
        """The kept layers K for a stack of `num_layers` blocks (checked against its depth)."""
        if self.keep_layers is None:
            return tuple(range(num_layers))
        bad = [i for i in self.keep_layers if i >= num_layers]
        check(not bad, f"lst.keep_layers {self.keep_layers}: layer(s) {bad} do not exist; "
                       f"this backbone has {num_layers} layers (0..{num_layers - 1})")
        return self.keep_layers

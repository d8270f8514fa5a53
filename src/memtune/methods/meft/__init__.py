"""MEFT — reversible adapters (Liao et al., NeurIPS 2023), variants 1–3, with measured error control.

    config.py       options (MEFTConfig and the fixed-variant meft1/meft2/meft3)
    coupling.py     adapters, F/G per variant, one layer's forward / inverse / backward
    reversible.py   the autograd Function over a span of layers (stores only its top output)
    calibrate.py    reconstruction and gradient errors, the automatic segments
    model.py        the wrapped model: stack, segments, read-out, describe()

    model = memtune.wrap(memtune.load_model("minilm"), "meft1", num_labels=2)
    model(**batch).loss.backward()     # the first training forward measures the error and picks segments
    print(model.describe())            # what it chose (also logged on the "memtune.meft" logger)
    print(reconstruction_error(model, batch))   # per-layer errors, adapter-gradient error, segments

Distributed data parallel (also through Accelerate) needs no `find_unused_parameters`: the adapters are
inputs of the reversible autograd Function, so DDP sees them used in every forward (True works as well).
Ranks may choose different segments from their own first batches; that changes only the rounding.
Supported: BERT-like encoders (BERT, RoBERTa, MiniLM, MPNet), ViT/DINOv2, Llama-like decoders (causal LM
through the frozen LM head, or classification), and T5 encoder-decoders (two reversible stacks: the
decoder's F/G include its cross-attention to the memory, whose gradient flows back into the encoder's
span); not head masks or a KV cache.
"""
from __future__ import annotations

from .calibrate import ReconstructionReport
from .config import MEFT1Config, MEFT2Config, MEFT3Config, MEFTConfig, ReversibleAdapterConfig
from .model import MEFTModel

MEFTConfig.model_class = MEFTModel              # MEFT1Config, MEFT2Config and MEFT3Config inherit it


def reconstruction_error(model, batch, segment_layers: int | None = None, decoder: bool = False
                         ) -> ReconstructionReport:
    """Relative error of the reversible span's recomputed inputs against the forward, per layer, on `batch`,
    and of its adapter gradients against ordinary autograd (first rows of the batch).

    Measured with uniform segments of `segment_layers` if given, else with the model's segmentation; a
    model whose segmentation is automatic and not chosen yet is calibrated on this batch first (and keeps
    the choice). Runs in the model's mode (train: dropout replayed) and under the caller's autocast; the
    global random generators are left as they were. decoder=True: an encoder-decoder's decoder stack.
    """
    model = getattr(model, "module", model)                     # unwrap DDP
    if segment_layers is None and model.stack(decoder).segments is None:
        report = model.calibrate(batch)
        return model.decoder_report if decoder else report
    return model.measure(batch, segment_layers, decoder)


CONFIGS = [MEFTConfig, MEFT1Config, MEFT2Config, MEFT3Config]

__all__ = ["CONFIGS", "MEFTConfig", "MEFT1Config", "MEFT2Config", "MEFT3Config", "ReversibleAdapterConfig",
           "MEFTModel", "ReconstructionReport", "reconstruction_error"]

"""What every method shares: a validated config dataclass and the wrapped model around a backbone.

A method is a `MethodConfig` subclass (its options, checked on construction) and a `MemtuneModel`
subclass that declares which parameters train and computes features from the backbone:

    is_trainable(name) -> bool      (default: every parameter outside `backbone.`)
    features(batch) -> B×F          (classification: the head maps F → num_labels)
                    -> B×T×d        (causal LM: finished token states; the frozen LM head maps d → V)
                    -> B×Tt×d       (seq2seq: the decoder's finished states; the tied LM head maps d → V)

The method's package binds the two (`XConfig.model_class = XModel` in its `__init__.py`, so that `config.py`
holds data only) and lists its configs in `CONFIGS` for `registry.py`.
"""
from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput, Seq2SeqLMOutput, SequenceClassifierOutput

from ..backbones import Backbone, families_with


class ConfigError(ValueError):
    """A bad method option; the message says which option, what was given and what is allowed."""


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _coerce(tp, value, name):
    """Turn a CLI string (or JSON value) into the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_coerce(args[0], v.strip() if isinstance(v, str) else v, name) for v in items if v != "")
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        try:
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: expected {tp.__name__}, got {value!r}") from None
    return value


@dataclass
class MethodConfig:
    """Base of every method's options. Subclasses add fields and override `validate`."""

    name: ClassVar[str] = ""
    # The model the config builds; set by the method package's __init__.py.
    model_class: ClassVar[type["MemtuneModel"]]
    # Backbone capabilities the method needs (Backbone.capabilities; empty: every family).
    requires: ClassVar[tuple[str, ...]] = ()
    # Learning rate used when the user gives none (side networks want ~10x full fine-tuning's).
    default_lr: ClassVar[float] = 1e-3

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            setattr(self, f.name, _coerce(hints[f.name], getattr(self, f.name), f"{self.name}.{f.name}"))
        self.validate()

    def validate(self) -> None:
        pass

    @classmethod
    def lr_for(cls, family: str) -> float:
        """The learning rate used when the user gives none, for a backbone family (default: `default_lr`)."""
        return cls.default_lr

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{cls.name}: unknown option(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(sorted(known)) or 'none'}")
        return cls(**d)

    @classmethod
    def supported_families(cls) -> list[str]:
        return families_with(cls.requires)

    def check_family(self, backbone: Backbone) -> None:
        missing = [c for c in self.requires if c not in backbone.capabilities]
        if missing:
            why = "; ".join(backbone.why_lacking(c) for c in missing)
            raise ConfigError(f"method {self.name!r} does not support the {backbone.family} family ({why}); "
                              f"supported families: {', '.join(self.supported_families())}")


def objective_for(backbone: Backbone, num_labels: int | None) -> str:
    """The training objective a head of `num_labels` outputs means: "classification", "regression" (one output,
    transformers' convention: MSE, float labels), or without a head the backbone's own LM head: "causal-lm" for
    decoders, "seq2seq" (text-to-text) for encoder-decoders."""
    if num_labels is not None:
        return "regression" if num_labels == 1 else "classification"
    if backbone.is_causal_lm:
        return "causal-lm"
    if backbone.is_encoder_decoder:
        return "seq2seq"
    raise ConfigError(f"the {backbone.family} family needs num_labels (classification or regression); decoders "
                      "have a causal-LM objective and encoder-decoders a text-to-text (seq2seq) one")


class _AppliesTrainable(type):
    """Metaclass of MemtuneModel: once a model is constructed (every subclass's __init__ has run, so every
    parameter exists), requires_grad of each parameter is set from the model's `is_trainable`."""

    def __call__(cls, *args, **kwargs):
        model = super().__call__(*args, **kwargs)
        model.apply_trainable()
        return model


class MemtuneModel(nn.Module, metaclass=_AppliesTrainable):
    """A backbone, a method's trainable parts and a head. Call it like a transformers model."""

    # Image-text compositions (backbones/image_text.py): True for methods whose features run the text backbone's
    # own forward, which then reads the visual tokens as a trainable prefix (docs/methods/vl.md §4); methods with
    # their own visual path (LST's side-only mode A) or none keep False, and the backbone never sees the image.
    visual_prefix: ClassVar[bool] = False
    # True for methods with their own visual path on a composition (LST-VL's side tokens, SHERL-VL); a method
    # with neither would train on the text alone, so a composition is refused for it.
    visual_path: ClassVar[bool] = False
    # The objective of a model whose objective does not follow from num_labels and the backbone (`objective_for`):
    # SHERL's retrieval towers ("retrieval": no head, a loss over image-caption similarities). None elsewhere.
    fixed_objective: ClassVar[str | None] = None
    # The `chunked_ce` technique (techniques/chunked_loss.py): the LM loss of a step with autograd on takes its
    # logits `lm_loss_chunk_rows` rows at a time (None: 2^24 / V) and the output carries no logits.
    chunked_ce: bool = False
    lm_loss_chunk_rows: int | None = None

    def __init__(self, backbone: Backbone, config: MethodConfig, num_labels: int | None = None):
        super().__init__()
        config.check_family(backbone)
        if "visual_side_tokens" in backbone.capabilities and not (self.visual_prefix or self.visual_path):
            from .registry import METHODS

            readers = [n for n, c in METHODS.items() if c.model_class.visual_prefix or c.model_class.visual_path]
            raise ConfigError(f"{config.name} does not read the image of an image-text composition (it would train "
                              f"on the text alone); methods that do: {', '.join(readers)}")
        self.backbone = backbone
        if self.visual_prefix and hasattr(backbone, "add_visual_prefix"):
            backbone.add_visual_prefix()
        self.method_config = config
        self.base_name: str = ""
        self.objective = self.fixed_objective or objective_for(backbone, num_labels)
        self.num_labels = num_labels
        # seq2seq: the text each class is generated as, in class order (`wrap(..., label_words=)`).
        self.label_words: list[str] | None = None
        self.head = nn.Linear(self.feature_size, num_labels) if num_labels else None

    @property
    def per_token(self) -> bool:
        """True when `features` returns token states for the LM head (causal LM, seq2seq) rather than pooled
        features for a classification or regression head."""
        return self.objective in ("causal-lm", "seq2seq")

    # -- what the method decides -------------------------------------------------------------------
    @property
    def feature_size(self) -> int:
        return self.backbone.feature_size

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def cache_bytes(self) -> int:
        """Host bytes held by the method's trunk cache (`self.trunk_cache`; 0 without one)."""
        cache = getattr(self, "trunk_cache", None)
        return 0 if cache is None else cache.nbytes

    # -- what trains ---------------------------------------------------------------------------------
    def is_trainable(self, name: str) -> bool:
        """Whether the parameter `name` (as `named_parameters()` names it) trains. Default: everything outside
        the backbone, i.e. the head and the method's own modules."""
        return not name.startswith("backbone.")

    def trains(self, name: str) -> bool:
        """The rule applied: `is_trainable`, overridden by the backbone's `always_trainable` / `never_trainable`
        name prefixes (an image-text composition: its visual prefix always trains, its vision encoder never)."""
        if name.startswith("backbone."):
            inner = name[len("backbone."):]
            if inner.startswith(getattr(self.backbone, "never_trainable", ())):
                return False
            if inner.startswith(getattr(self.backbone, "always_trainable", ())):
                return True
        return self.is_trainable(name)

    def no_weight_decay(self) -> set[str]:
        """Names of trainable parameters the optimizer leaves without weight decay (default: none)."""
        return set()

    def apply_trainable(self) -> None:
        """requires_grad from `trains` on every parameter (done once the model is constructed)."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.trains(name))

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The declared trainable parameters by name: what the optimizer updates and a checkpoint holds."""
        return [(n, p) for n, p in self.named_parameters() if self.trains(n)]

    def parameter_groups(self) -> list[dict]:
        """Optimizer parameter groups of the trainable parameters: `no_weight_decay()` in a group with
        weight_decay 0, the rest at the optimizer's own setting (empty groups left out)."""
        skip = self.no_weight_decay()
        trainable = self.trainable_named_parameters()
        groups = [{"params": [p for n, p in trainable if n not in skip]},
                  {"params": [p for n, p in trainable if n in skip], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    # -- shared machinery ----------------------------------------------------------------------------
    # transformers.Trainer: the loss is a mean over this batch, so no `num_items_in_batch` is passed in.
    accepts_loss_kwargs = False

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, pixel_values=None,
                decoder_input_ids=None, labels=None, example_id=None, **extra):
        # Named inputs so that transformers.Trainer, which keeps only the columns named in this signature,
        # passes every input through (and finds `labels`); other keys still reach the method via **extra.
        named = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                     pixel_values=pixel_values, decoder_input_ids=decoder_input_ids, labels=labels,
                     example_id=example_id)
        batch = {**{k: v for k, v in named.items() if v is not None}, **extra}
        if self.objective == "seq2seq":
            return self._seq2seq_forward(batch)
        feats = self.features(batch)
        if self.objective == "causal-lm":
            if labels is not None and self._chunks_lm_loss():
                # Next-token prediction on B×(T-1) states: the chunked loss holds no B×T×V logits.
                return CausalLMOutput(loss=self.chunked_lm_loss(feats[:, :-1], labels[:, 1:]), logits=None)
            logits = self.lm_logits(feats)                                # B×T×V
            loss = None
            if labels is not None:
                # Next-token prediction: position t predicts token t+1; -100 marks padding.
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                       ignore_index=-100)
            return CausalLMOutput(loss=loss, logits=logits)
        logits = self.head(feats)                                          # B×C (regression: B×1)
        return SequenceClassifierOutput(loss=self.head_loss(logits, labels) if labels is not None else None,
                                        logits=logits)

    def _seq2seq_forward(self, batch) -> Seq2SeqLMOutput:
        """Teacher forcing: the decoder reads the targets shifted right (unless the batch gives its own
        decoder_input_ids); the loss is the token cross-entropy over real target positions (-100 skipped)."""
        labels = batch.get("labels")
        if "decoder_input_ids" not in batch and labels is not None:
            batch["decoder_input_ids"] = self.backbone.shift_right(labels)
        feats = self.features(batch)                                       # B×Tt×d
        if labels is not None and self._chunks_lm_loss():
            return Seq2SeqLMOutput(loss=self.chunked_lm_loss(feats, labels), logits=None)
        logits = self.lm_logits(feats)                                     # B×Tt×V
        loss = None if labels is None else self.lm_loss(logits, labels)
        return Seq2SeqLMOutput(loss=loss, logits=logits)

    def _chunks_lm_loss(self) -> bool:
        """The chunked loss runs where a backward will follow: with `chunked_ce` and autograd recording. Under
        no_grad (evaluation, scoring, generation) the logits are computed and returned as usual."""
        return self.chunked_ce and torch.is_grad_enabled()

    def chunked_lm_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The token cross-entropy of lm_logits(h) against targets (-100 skipped), chunk by chunk: equal to
        the plain loss, with the LM head's logits never whole (techniques/chunked_loss.py)."""
        from ..techniques.chunked_loss import chunked_lm_loss

        params = [p for p in self.parameters() if p.requires_grad]     # the head uses few or none of them
        return chunked_lm_loss(h, targets, self.lm_logits, params, self.lm_loss_chunk_rows,
                               self.backbone.config.vocab_size)

    def lm_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Token states …×d → …×V through the frozen LM head: the decoder's own (causal LM) or the tied input
        embedding of an encoder-decoder (seq2seq)."""
        if self.backbone.is_encoder_decoder:
            return self.backbone.tied_lm_logits(h)
        return self.backbone.lm_logits(h)

    @staticmethod
    def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Seq2seq token cross-entropy in fp32: logits B×Tt×V against targets B×Tt (-100 skipped)."""
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def head_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of the head's outputs, in fp32 whatever the autocast dtype: cross-entropy over the classes
        (labels B, ids), or for regression the mean squared error of the one output (labels B, floats)."""
        if self.objective == "regression":
            return F.mse_loss(logits.float().squeeze(-1), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def num_parameters_split(self) -> tuple[int, int]:
        """(trainable, total) parameter counts, each shared tensor counted once."""
        total = sum(p.numel() for p in self.parameters())
        return sum(p.numel() for _, p in self.trainable_named_parameters()), total

    def save_pretrained(self, directory, state_dict=None, is_main_process: bool = True, **kwargs) -> None:
        """adapter_config.json + adapter_model.safetensors (the trainable tensors only). Accepts the
        arguments transformers passes: `state_dict` (a gathered full state dict; its trainable entries are
        saved), `is_main_process` (False: write nothing); others (safe_serialization, ...) are ignored:
        memtune always writes safetensors."""
        from ..checkpoint import save_adapter

        if is_main_process:
            save_adapter(self, directory, state_dict)

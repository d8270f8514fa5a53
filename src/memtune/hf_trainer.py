"""Training a memtune model with `transformers.Trainer`.

A wrapped model trains under the plain `Trainer` as it is: its `forward` names the inputs (input_ids,
attention_mask, token_type_ids, pixel_values, decoder_input_ids, labels, example_id), so Trainer keeps
those columns with the default `remove_unused_columns=True`, finds `labels`, and reads `loss` from the
output. What the plain Trainer cannot do is checkpoint it well: for a module that is not a
`PreTrainedModel` or `PeftModel`, transformers 5 saves `model.state_dict()` into `model.safetensors`,
the whole frozen backbone included, and fails on models with tied weights (T5, Llama with tied
embeddings: safetensors refuses shared tensors). Its `_save` offers no hook, hence this small subclass:

    trainer = MemtuneTrainer(model=memtune.wrap(base, "lst", num_labels=2), args=TrainingArguments(...), ...)
    trainer.train()                                     # checkpoint-N/ = adapter files + optimizer + state
    trainer.train(resume_from_checkpoint=True)          # resumes from the newest checkpoint-N
    memtune.load(base, "out/checkpoint-N")              # the checkpoint is a memtune adapter folder

Each checkpoint holds `adapter_config.json` + `adapter_model.safetensors` (the trainable tensors only),
plus what Trainer itself writes beside them (optimizer.pt, scheduler.pt, rng_state.pth,
trainer_state.json, training_args.bin: Trainer's own pickles, never read by `memtune.load`).
For any other model the class behaves exactly like `Trainer`.

Memory techniques: `MemtuneTrainer(model, args, techniques="nf4+gc")`, or a model wrapped with them;
`TrainingArguments(gradient_checkpointing=True)` turns on memtune's block checkpointing (gc).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from transformers import Trainer

from .checkpoint import CONFIG_NAME, check_compatible, load_weights, read_adapter_config
from .methods import ConfigError, MemtuneModel



class MemtuneTrainer(Trainer):
    """`transformers.Trainer` whose checkpoints hold only what the method trains (see the module doc)."""

    def __init__(self, model=None, args=None, *a, techniques=None, **kw):
        # Memory techniques: `techniques="nf4+gc"` (or a model wrapped with them). TrainingArguments'
        # activation / gradient checkpointing means memtune's block checkpointing here: transformers' own
        # checkpointing hooks do not reach blocks that memtune's backbones call directly.
        if isinstance(model, MemtuneModel):
            from .techniques import MemoryTechniques, apply_techniques

            t = MemoryTechniques.coerce(techniques)
            have = getattr(model, "memory_techniques", None) or MemoryTechniques()
            flags = [f for f in ("activation_checkpointing", "gradient_checkpointing") if getattr(args, f, False)]
            if flags:
                for f in flags:                # transformers 5 names it activation_checkpointing
                    setattr(args, f, False)
                if not have.gradient_checkpointing:
                    t = dataclasses.replace(t, gradient_checkpointing=True)
            if t:
                if have:
                    raise ConfigError(f"the model already has memory techniques {'+'.join(have.names())}; "
                                      "apply techniques once (memtune.wrap(..., techniques=...) or here)")
                apply_techniques(model, t)
        super().__init__(model, args, *a, **kw)

    def _memtune_model(self, model=None) -> MemtuneModel | None:
        m = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        return m if isinstance(m, MemtuneModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._memtune_model()
        if model is None:
            return super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # state_dict: given by Trainer under FSDP/DeepSpeed (gathered); its trainable entries are saved.
        model.save_pretrained(output_dir, state_dict=state_dict)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        # The training arguments as JSON (Trainer's own default pickles them; memtune writes no pickles).
        with open(os.path.join(output_dir, "training_args.json"), "w", encoding="utf-8") as f:
            f.write(self.args.to_json_string())

    def _load_adapter_into(self, model: MemtuneModel, folder) -> None:
        check_compatible(read_adapter_config(folder), model)
        load_weights(model, folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self._memtune_model(model)
        if target is None or not (Path(resume_from_checkpoint) / CONFIG_NAME).exists():
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        self._load_adapter_into(target, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        target = self._memtune_model()
        best = self.state.best_model_checkpoint
        if target is None or self.is_deepspeed_enabled or self.is_fsdp_enabled or \
                not (Path(best) / CONFIG_NAME).exists():
            return super()._load_best_model()
        self._load_adapter_into(target, best)

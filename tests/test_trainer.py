"""transformers.Trainer: a wrapped model trains under it as it is; MemtuneTrainer checkpoints only the
trainable tensors (+ adapter_config.json), loads with `memtune.load`, and resumes to the same weights."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

import memtune
from memtune.hf_trainer import MemtuneTrainer


def dataset(tokenizer, n=16):
    # A "text" column the model does not take: Trainer must drop it (remove_unused_columns=True, the default).
    rows = []
    for i in range(n):
        text = f"{'good great fine' if i % 2 else 'bad awful poor'} movie {i}"
        rows.append({"text": text, **tokenizer(text), "label": i % 2})
    return rows


def make(name="tiny-bert", method="lora"):
    torch.manual_seed(0)
    loaded = memtune.load_model(name)
    return loaded, memtune.wrap(loaded, method, num_labels=2)


def args(out, **kw):
    base = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                learning_rate=1e-2, save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, seed=5,
                logging_steps=1)
    base.update(kw)
    return TrainingArguments(**base)


def trainable(model):
    return {n: p.detach().clone() for n, p in model.trainable_named_parameters()}


@pytest.mark.parametrize("method", ["lora", "lst", "dtl", "meft1"])
def test_plain_trainer_trains_a_wrapped_model_with_default_arguments(tmp_path, method):
    loaded, model = make(method=method)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = trainable(model)
    data = dataset(loaded.preprocessor)
    trainer = Trainer(model=model, args=args(tmp_path, save_strategy="no"), train_dataset=data, eval_dataset=data,
                      data_collator=DataCollatorWithPadding(loaded.preprocessor))
    assert trainer.label_names == ["labels"]
    out = trainer.train()
    assert out.global_step == 4 and torch.isfinite(torch.tensor(out.training_loss))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4
    after = trainable(model)
    assert any(not torch.equal(before[n], after[n]) for n in before), "no trainable tensor moved"
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), f"frozen {n} changed"
    assert "eval_loss" in trainer.evaluate()


def test_memtune_trainer_checkpoints_hold_only_the_trainable_tensors_and_load_back(tmp_path):
    loaded, model = make(method="lst")
    data = dataset(loaded.preprocessor)
    trainer = MemtuneTrainer(model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=2,
                                                    load_best_model_at_end=True, metric_for_best_model="eval_loss"),
                             train_dataset=data, eval_dataset=data,
                             data_collator=DataCollatorWithPadding(loaded.preprocessor))
    trainer.train()
    ckpt = tmp_path / "checkpoint-4"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, "the frozen backbone must not be saved"
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    names = [n for n, _ in model.trainable_named_parameters()]
    assert sorted(saved) == sorted(names)
    assert json.loads((ckpt / "adapter_config.json").read_text())["method"] == "lst"

    # load_best_model_at_end went through MemtuneTrainer._load_best_model; the best checkpoint equals the model.
    best = trainer.state.best_model_checkpoint
    reloaded = memtune.load(memtune.load_model("tiny-bert"), best)
    for n, p in reloaded.trainable_named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[n]), n


def test_resuming_a_trainer_checkpoint_gives_the_uninterrupted_weights(tmp_path):
    loaded, model = make(method="lora")
    data = dataset(loaded.preprocessor)
    collator = DataCollatorWithPadding(loaded.preprocessor)
    MemtuneTrainer(model=model, args=args(tmp_path / "a"), train_dataset=data, data_collator=collator).train()
    straight = trainable(model)

    class StopAfter2(TrainerCallback):      # an interrupted run: same schedule, ends after checkpoint-2
        def on_step_end(self, a, state, control, **kw):
            control.should_training_stop = state.global_step == 2

    _, fresh = make(method="lora")
    MemtuneTrainer(model=fresh, args=args(tmp_path / "b"), train_dataset=data, data_collator=collator,
                   callbacks=[StopAfter2()]).train()
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-2"]
    _, resumed = make(method="lora")
    trainer = MemtuneTrainer(model=resumed, args=args(tmp_path / "b"), train_dataset=data, data_collator=collator)
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    for n, t in trainable(resumed).items():
        assert torch.equal(t, straight[n]), f"{n} differs after resume"


def test_tied_embedding_models_checkpoint_under_memtune_trainer(tmp_path):
    """Plain Trainer writes state_dict() with safetensors, which refuses T5's shared embeddings."""
    loaded, model = make("tiny-t5", "lora")
    data = dataset(loaded.preprocessor, n=8)
    MemtuneTrainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=data,
                   data_collator=DataCollatorWithPadding(loaded.preprocessor)).train()
    memtune.load("tiny-t5", tmp_path / "checkpoint-2")

"""The training loop on Accelerate: progress bar, evaluation, atomic checkpoints, resume, NaN guard.

    metrics = train(TrainArgs(model="minilm", task="rotten-tomatoes", method="lora", out="runs/x"))

One process by default; `accelerate launch` (or `memtune train --num-processes N`) runs it with DDP.
Everything that decides the result is seeded: model init, data order (a permutation per epoch from
`seed + epoch`) and dropout (the torch generator, saved in checkpoints), so a resumed run ends with
the same weights as an uninterrupted one.
"""
from __future__ import annotations

import itertools
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler

from .api import wrap
from .backbones import family_class
from .atomic import disk_full, is_disk_full, write_json
from .checkpoint import tensor_bytes
from .data import load_task, make_collate
from .methods import config_for
from .models import load_model
from .evaluation import evaluate
from .preflight import check_task_modality
from .progress import Progress
from .resume import (finished_run_metrics, latest_checkpoint, load_training_checkpoint, read_selected,
                     save_training_checkpoint)
from .run_folder import RunFolder, check_run_folder, main_rank
from .run_info import git_commit, machine, versions
from .selection import BestEpoch
from .seq2seq import label_words_for, model_label_targets
from .techniques.quantize import QUANTIZE_KINDS

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
# causal-lm: decoders; regression: one output, MSE; seq2seq: encoder-decoders generate each class's label words
OBJECTIVES = ("classification", "causal-lm", "regression", "seq2seq")
# Methods with a two-tower retrieval form (config option form=retrieval), which image_caption tasks train.
RETRIEVAL_METHODS = ("sherl",)


class TrainingError(RuntimeError):
    """Training stopped (NaN loss, ...); the message names the step and the last good checkpoint."""


class ArgumentError(ValueError):
    """A bad training setting; the message says what is allowed."""


@dataclass
class TrainArgs:
    # Each field's metadata (help, choices) is its command-line flag (`memtune.cli.fields`).
    model: str = field(metadata={"help": "bundled alias (minilm, dinov2-s, tiny-bert, ...), folder or hub id"})
    task: str = field(metadata={"help": "rotten-tomatoes, fashion-mnist, digits, mnist-5k, drug-reviews, csv:PATH, "
                                        "jsonl:PATH, an image folder, digits-vqa / fashion-vqa[/template] "
                                        "(image + text models), digits-captions / fashion-captions / "
                                        "captions:PATH (image–caption retrieval, --method sherl), or "
                                        "glue/<name>, super_glue/<name>, vtab/<name> from --data-dir (docs/data.md)"})
    method: str = "lora"
    options: dict = field(default_factory=dict)       # method options, e.g. {"r": "16"}
    out: str = "runs/memtune"
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float | None = field(default=None, metadata={"help": "default: the method's own"})
    weight_decay: float = 0.0
    warmup_ratio: float = field(default=0.06, metadata={
        "help": "share of the steps with a linear warm-up (then linear decay to 0)"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the gradient norm to this value; 0: no clipping"})
    max_length: int = 128
    image_size: int | None = None
    seed: int = 0
    precision: str = field(default="fp32", metadata={"choices": tuple(PRECISIONS)})
    objective: str = field(default="classification", metadata={
        "choices": OBJECTIVES, "help": "regression: numeric labels of a csv/jsonl task (glue/stsb is regression "
                                       "by itself); seq2seq: T5/BART generate each class's label words through "
                                       "the tied LM head (text-to-text, as the LST paper trains T5)"})
    label_words: str | None = field(default=None, metadata={
        "help": "seq2seq: the text of each class, in class order (negative,positive) or as name=word pairs "
                "(default: the class names)"})
    train_limit: int | None = None
    test_limit: int | None = None
    text_column: str = field(default="text", metadata={
        "help": "csv/jsonl text column, or two comma-separated (sentence1,sentence2) for sentence pairs"})
    label_column: str = "label"
    data_dir: str | None = field(default=None, metadata={
        "help": "folder with your GLUE / SuperGLUE / VTAB-1k copy (default: $MEMTUNE_DATA_DIR); never downloads"})
    checkpoint_every: int | None = field(default=None, metadata={"help": "write an atomic checkpoint every N steps"})
    resume: str | None = field(default=None, metadata={"help": "continue from a run folder or checkpoint"})
    measure_memory: bool = field(default=False, metadata={"help": "measure one step's peak memory first"})
    eval_before: bool = field(default=False, metadata={"help": "also evaluate the model before training"})
    memory_batch_size: int | None = field(default=None, metadata={
        "help": "batch of the memory run (default: --batch-size)"})
    memory_max_length: int | None = field(default=None, metadata={
        "help": "padded length of the memory run (default: --max-length)"})
    progress: bool = field(default=True, metadata={"help": "no progress bars (logs, CI)"})
    # Memory techniques orthogonal to the method (`memtune.techniques`): gc, nf4 / fp4 / int8, offload, chunked_ce.
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the backbone blocks that the backward pass crosses (+gc)"})
    quantize: str | None = field(default=None, metadata={"choices": QUANTIZE_KINDS, "help": "frozen base weights in "
                                 "4 or 8 bits through bitsandbytes (+nf4, +fp4, +int8)"})
    offload_activations: bool = field(default=False, metadata={
        "help": "keep saved activations in pinned CPU memory during the step (CUDA only; +offload)"})
    chunked_ce: bool = field(default=False, metadata={
        "help": "causal-LM / seq2seq loss a chunk of tokens at a time, without the vocabulary-wide logits "
                "(+chunked_ce)"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the run already in --out (its checkpoints, adapter and metrics are removed)"})
    val_fraction: float = field(default=0.0, metadata={
        "help": "hold out this share of the training data as a validation split (reported as val_*)"})
    select_best: bool = field(default=False, metadata={
        "help": "evaluate the validation split after every epoch and test the best epoch's weights (the LST, "
                "SHERL and QST recipes); needs --val-fraction"})

    def techniques(self):
        from .techniques import MemoryTechniques

        return MemoryTechniques(self.gradient_checkpointing, self.quantize, self.offload_activations,
                                self.chunked_ce)

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ArgumentError(msg)
        need(self.batch_size >= 1 and self.batch_size <= 65536,
             f"--batch-size must be between 1 and 65536, got {self.batch_size}")
        need(1 <= self.eval_batch_size <= 65536,
             f"--eval-batch-size must be between 1 and 65536, got {self.eval_batch_size}")
        need(self.epochs > 0 or (self.max_steps or 0) > 0, "give --epochs > 0 or --max-steps > 0")
        need(self.max_steps is None or self.max_steps >= 1, f"--max-steps must be >= 1, got {self.max_steps}")
        need(self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"--lr must be > 0, got {self.lr}")
        need(self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}")
        need(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        need(not self.select_best or self.val_fraction > 0,
             "--select-best picks an epoch on the validation split: give --val-fraction too (e.g. 0.1)")
        need(self.precision in PRECISIONS, f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        need(self.objective in OBJECTIVES,
             f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        need(self.label_words is None or self.objective == "seq2seq",
             f"--label-words applies to --objective seq2seq, not {self.objective}")
        need(self.checkpoint_every is None or self.checkpoint_every >= 1,
             f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        need(0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.grad_clip >= 0 and math.isfinite(self.grad_clip),
             f"--grad-clip must be a finite norm >= 0 (0: no clipping), got {self.grad_clip}")
        need(self.quantize in (None, *QUANTIZE_KINDS), f"--quantize must be nf4, fp4 or int8, got {self.quantize!r}")
        if self.precision == "fp16" and not torch.cuda.is_available():
            raise ArgumentError("--precision fp16 needs a CUDA GPU (CPU autocast supports bf16); use bf16 or fp32")


class EpochSampler(Sampler):
    """A fresh seeded permutation each epoch: the data order is a function of (seed, epoch) only."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return i, self.examples[i]


class _WithIds:
    """Collate wrapper that adds `example_id` (B,) so methods can cache per-example work."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        batch = self.collate([ex for _, ex in items])
        batch["example_id"] = torch.tensor([i for i, _ in items], dtype=torch.long)
        return batch


# -- building blocks shared by train, eval and compare -------------------------------------------------
def build(args: TrainArgs, loaded=None, task=None):
    """Load model and task and wrap the model: returns (model, task, loaded, collate)."""
    loaded = loaded or load_model(args.model)
    task = task or load_args_task(args)
    retrieval = task.kind == "image_caption"     # image–caption pairs: a two-tower retrieval model
    check_task_modality(task.kind, args.task, loaded)
    if retrieval and args.objective != "classification":
        raise ArgumentError(f"task {args.task!r} trains a retrieval model (a contrastive loss over image–caption "
                            f"pairs); leave --objective at its default, not {args.objective}")
    check_length(loaded, args.max_length)
    lm_head = args.objective in ("causal-lm", "seq2seq")          # no class head: the model's LM head
    if lm_head and task.regression:
        raise ArgumentError(f"task {args.task!r} has numeric (regression) labels; train it without "
                            f"--objective {args.objective}")
    if args.objective == "seq2seq" and not family_class(loaded.model.config).is_encoder_decoder:
        raise ArgumentError(f"--objective seq2seq needs an encoder-decoder model (T5, BART); {args.model!r} is "
                            f"{loaded.model.config.model_type}: use classification (or causal-lm for decoders)")
    options = dict(args.options)
    if retrieval:
        if args.method not in RETRIEVAL_METHODS:
            raise ArgumentError(f"task {args.task!r} pairs images with captions, which trains a two-tower retrieval "
                                f"model; methods with a retrieval form: {', '.join(RETRIEVAL_METHODS)}")
        options.setdefault("form", "retrieval")
    config = config_for(args.method, options)
    words = label_words_for(task.label_names, args.label_words) if args.objective == "seq2seq" else None
    # A regression task has a one-output head (num_labels 1: the model's objective is then "regression").
    # Retrieval: no head (the loss reads the similarities of the pairs; labels mark pairs of one class).
    no_names = args.objective == "causal-lm" or task.regression or retrieval
    model = wrap(loaded, config, num_labels=None if lm_head or retrieval else task.num_labels, name=args.model,
                 label_names=None if no_names else task.label_names,
                 label_words=words, techniques=args.techniques())
    model.preprocessing = {"max_length": args.max_length, "image_size": args.image_size}  # saved for predict
    return model, task, loaded, make_collate(task.kind, loaded.preprocessor,
                                             **collate_options(args, task, model, loaded.preprocessor))


def load_args_task(args: TrainArgs):
    """The task of a run's settings (data folder, sentence-pair columns, regression included)."""
    return load_task(args.task, text_column=args.text_column, label_column=args.label_column, seed=args.seed,
                     train_limit=args.train_limit, test_limit=args.test_limit, val_fraction=args.val_fraction,
                     data_dir=args.data_dir, regression=args.objective == "regression")


def collate_options(args: TrainArgs, task, model, tokenizer, **overrides) -> dict:
    """make_collate's keywords for a run: lengths, and causal-LM, regression or text-to-text labels (each class's
    label-word ids from `tokenizer`)."""
    causal = args.objective == "causal-lm"
    return {"max_length": args.max_length, "image_size": args.image_size, "causal_lm": causal,
            "regression": task.regression and not causal,
            "label_targets": model_label_targets(model, tokenizer), **overrides}


def task_metric_fields(task, model) -> dict:
    """metrics.json's `main_metric` (what selection and the compare table use) and `task_metrics` (the task's
    metrics, main first); none for a causal LM."""
    if model.objective == "causal-lm":
        return {}
    return {"main_metric": task.main_metric, "task_metrics": list(task.metrics)}


def check_length(loaded, max_length: int) -> None:
    limit = getattr(loaded.model.config, "max_position_embeddings", None)
    if loaded.modality == "text" and limit and max_length > limit:
        raise ArgumentError(f"--max-length {max_length} exceeds the model's {limit} positions; "
                            f"use --max-length {limit} or less")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def measure_memory(args: TrainArgs) -> dict:
    """Peak memory of one training step on a fresh model, inputs padded to exactly max_length."""
    from .memory.measure import measure_training_memory

    model, batch, optimizer, autocast = memory_step(args)
    cuda = batch["example_id"].device.type == "cuda"
    report = measure_training_memory(model, batch, optimizer, warmup=3 if cuda else 2, steps=5 if cuda else 1,
                                     autocast=autocast)
    return report.to_dict()


def memory_step(args: TrainArgs, batch=None):
    """What the memory run steps: (fresh model in training mode, batch, optimizer, autocast or None), on CUDA
    where there is one. The batch is --memory-batch-size training examples padded to exactly
    --memory-max-length, unless `batch` (a dict of CPU tensors with the model's input keys) is given."""
    seed_everything(args.seed)
    length = args.memory_max_length or args.max_length
    model, task, loaded, _ = build(args)
    check_length(loaded, length)
    if batch is None:
        collate = make_collate(task.kind, loaded.preprocessor,
                               **collate_options(args, task, model, loaded.preprocessor, max_length=length,
                                                 pad_to_max_length=True))
        examples = list(itertools.islice(itertools.cycle(task.train), args.memory_batch_size or args.batch_size))
        batch = collate(examples)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    # Distinct example ids, as the training loader gives them: a trunk-cached method measures its filling step.
    rows = next(iter(batch.values())).shape[0]
    batch = {k: v.to(device) for k, v in {**batch, "example_id": torch.arange(rows)}.items()}
    autocast = None
    if args.precision != "fp32":
        autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float16)
    return model, batch, make_optimizer(model, args), autocast


def make_optimizer(model, args: TrainArgs):
    params = model.parameter_groups()
    lr = args.lr or model.method_config.lr_for(model.backbone.family)
    return torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)


# -- the loop -------------------------------------------------------------------------------------------
def make_accelerator(precision: str = "fp32"):
    """The loop's Accelerator: one process, or DDP across the processes a launcher started.

    On a machine without CUDA it asks for CPU processes (gloo): Accelerate sets up CPU DDP only when
    told to. Side networks can leave parameters unused in a step (e.g. gates of dropped layers), so
    DDP looks for them (find_unused_parameters=True).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=PRECISIONS[precision], cpu=cpu,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _stopped(what: str, step: int, out: Path) -> TrainingError:
    good = latest_checkpoint(out)
    return TrainingError(f"{what} at step {step}; training stopped before updating the weights. Last good "
                         f"checkpoint: {good or 'none written yet'}. Try a lower --lr or --precision fp32.")


def train(args: TrainArgs) -> dict:
    """Train, evaluate and save one run into `args.out`, which it holds locked. A finished run given to
    --resume is not trained again: its saved metrics come back, with `already_finished: True`."""
    args.validate()
    if main_rank():                     # other DDP ranks write nothing and would see the main rank's lock
        check_run_folder(args.out, args.resume, args.overwrite)
    with RunFolder(args.out, args.overwrite) as folder:
        return _train(args, folder)


def _train(args: TrainArgs, folder: RunFolder) -> dict:
    from transformers import get_linear_schedule_with_warmup

    t_start = time.time()
    out = Path(args.out)
    memory = measure_memory(args) if args.measure_memory else None

    seed_everything(args.seed)
    model, task, loaded, collate = build(args)
    folder.clear_previous_run(args.resume)          # --overwrite: only now that model and task have loaded
    if getattr(model, "data_init_pending", False) and not args.resume:
        # Data-dependent initialisation (LST's Fisher pruning): single examples of the shuffled training set.
        order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(args.seed)).tolist()
        model.initialize_from_fisher(collate([task.train[i] for i in order[s:s + 32]])
                                     for s in range(0, len(order), 32))
    accelerator = make_accelerator(args.precision)
    if accelerator.distributed_type in ("FSDP", "DEEPSPEED"):
        # This loop saves, checkpoints and evaluates unsharded parameters: right under DDP only.
        kind = accelerator.distributed_type.value
        raise ArgumentError(f"memtune train runs in one process or with DDP, not with {kind} (an accelerate config "
                            "chose it); use memtune.hf_trainer.MemtuneTrainer with transformers' FSDP/DeepSpeed "
                            "support instead (docs/distributed.md)")
    sampler = EpochSampler(len(task.train), args.seed)
    # The loader gets its own generator: creating an iterator must not draw from the global RNG, which
    # drives dropout (a resumed run creates one iterator more than an uninterrupted one).
    loader = DataLoader(_Indexed(task.train), batch_size=args.batch_size, sampler=sampler,
                        collate_fn=_WithIds(collate), drop_last=len(task.train) >= args.batch_size,
                        generator=torch.Generator().manual_seed(args.seed))
    cache = getattr(model, "trunk_cache", None)
    if cache is not None:               # each process stores the examples of its shard of every epoch
        cache.expected_examples = min(len(task.train), len(loader) * args.batch_size) // accelerator.num_processes
    steps_per_epoch = math.ceil(len(loader) / accelerator.num_processes)
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))
    optimizer = make_optimizer(model, args)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)

    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    selector = BestEpoch(task.main_metric if task_metric_fields(task, model) else None)
    if args.resume:
        # A finished run is checked against this model (method, classes, intact files) before it is reported.
        finished = finished_run_metrics(args.resume, total_steps, model)
        if finished is not None and latest_checkpoint(args.resume) is None:
            return finished                         # nothing to train; metrics.json stays as it is
        progress = load_training_checkpoint(args.resume, model, optimizer, scheduler)
        if finished is not None:
            return finished
        if args.select_best:
            selector.load(progress.get("selection"), read_selected(args.resume))
        accelerator.print(f"memtune: resumed from {latest_checkpoint(args.resume)} at step {progress['step']}")
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    unwrapped = accelerator.unwrap_model(model)

    trainable, total = unwrapped.num_parameters_split()
    step_times, last_loss = [], progress.get("loss", float("nan"))
    before = None
    if args.eval_before and not args.resume:
        before = evaluate(unwrapped, task.test, collate, args.eval_batch_size, accelerator.device,
                          progress=args.progress and accelerator.is_main_process)
    bar = Progress(total_steps, args.method, enabled=args.progress and accelerator.is_main_process,
                   initial=progress["step"], items_per_update=args.batch_size * accelerator.num_processes)

    def select(epoch: float) -> None:
        """--select-best: score the validation split now and keep the weights if they are the best yet."""
        val = evaluate(unwrapped, task.validation, collate, args.eval_batch_size, accelerator.device,
                       progress=args.progress and accelerator.is_main_process)
        best = selector.offer(unwrapped, val, epoch, progress["step"])
        score = selector.history[-1]
        bar.write(f"memtune: epoch {epoch:.3g}: validation {score['metric']} {score['value']:.4f}"
                  + (" (best so far)" if best else ""))
        progress["selection"] = selector.state()

    model.train()
    while progress["step"] < total_steps:
        # The prepared loader sets its sampler's epoch from its own iteration counter: tell it the real one.
        loader.set_epoch(progress["epoch"])
        batches = itertools.islice(iter(loader), progress["batch_in_epoch"], None)
        for batch in batches:
            t0 = time.perf_counter()
            with accelerator.autocast():
                loss = model(**batch).loss
            check = accelerator.reduce(loss.detach(), "mean")
            if not torch.isfinite(check):
                raise _stopped(f"loss became {check.item()}", progress["step"] + 1, out)
            accelerator.backward(loss)
            if args.grad_clip:
                norm = accelerator.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
                # A non-finite gradient would poison the weights (and the next checkpoint) with a finite loss.
                # fp16 is exempt: its grad scaler skips such steps by design. (DeepSpeed returns no norm.)
                if norm is not None and args.precision != "fp16" and not torch.isfinite(torch.as_tensor(norm)):
                    raise _stopped(f"the gradient norm became {float(norm)}", progress["step"] + 1, out)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - t0)
            last_loss = progress["loss"] = check.item()
            progress["step"] += 1
            progress["batch_in_epoch"] += 1
            bar.update(loss=last_loss)
            if args.checkpoint_every and progress["step"] % args.checkpoint_every == 0:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    save_training_checkpoint(out, unwrapped, optimizer, scheduler, dict(progress),
                                             selected=selector.tensors)     # None without --select-best
            if progress["step"] >= total_steps:
                break
        else:
            progress["epoch"] += 1
            progress["batch_in_epoch"] = 0
            if args.select_best:
                select(progress["epoch"])
    if args.select_best:        # the last weights compete too (a run that ends mid-epoch, or at the last epoch)
        if not selector.history or selector.history[-1]["step"] != progress["step"]:
            select(progress["step"] / steps_per_epoch)
        selector.restore(unwrapped)
    bar.close()

    results = evaluate(unwrapped, task.test, collate, args.eval_batch_size, accelerator.device,
                       progress=args.progress and accelerator.is_main_process)
    if task.validation:       # held out of training: model / learning-rate selection (`memtune.sweep`)
        val = evaluate(unwrapped, task.validation, collate, args.eval_batch_size, accelerator.device,
                       progress=args.progress and accelerator.is_main_process)
        results.update({f"val_{k}": v for k, v in val.items()})
    timed = step_times[2:] or step_times
    metrics = {
        "method": args.method, "model": args.model, "task": args.task,
        "trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / total,
        "steps": progress["step"], "train_loss": last_loss,
        "step_time_s": statistics.median(timed) if timed else None,
        "samples_per_s": (args.batch_size * accelerator.num_processes / statistics.median(timed)) if timed else None,
        **results,
        **task_metric_fields(task, unwrapped),
        **({"before": before} if before else {}),
        **({"selection": selector.summary()} if args.select_best else {}),
        "train_examples": len(task.train), "test_examples": len(task.test),
        "settings": {k: v for k, v in asdict(args).items() if k not in ("progress", "overwrite")},
        "config": unwrapped.method_config.to_dict(),
        "num_processes": accelerator.num_processes,
        "versions": versions(), "git_commit": git_commit(), "machine": machine(),
        "wall_time_s": time.time() - t_start,
    }
    if memory:
        metrics["memory"] = memory
        metrics["peak_bytes"] = memory["peak_bytes"]
        metrics["activation_peak_bytes"] = memory["activation_peak_bytes"]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            unwrapped.save_pretrained(out)
            write_json(out / "metrics.json", metrics)          # last: its presence marks a finished run
        except Exception as e:
            if not is_disk_full(e):
                raise
            good = latest_checkpoint(out)
            kept = (f"last checkpoint kept: {good}; free some space and rerun with --resume {out} to finish"
                    if good else "no checkpoint was written (use --checkpoint-every to keep one)")
            raise disk_full(out, "the final adapter", tensor_bytes(dict(unwrapped.trainable_named_parameters())),
                            kept) from None
    return metrics

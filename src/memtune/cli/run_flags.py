"""The flags of a training run, generated from `TrainArgs` (see `cli.fields`).

Every `TrainArgs` field is a flag of both `memtune train` and `memtune compare` unless it is named below: a new
field becomes a flag of both by being declared there, with its help in its metadata.
"""
from __future__ import annotations

import dataclasses

from .fields import add_field_flags, given

TRAIN_ONLY = ("method", "out", "checkpoint_every", "resume", "overwrite", "measure_memory", "eval_before")
TECHNIQUES = ("gradient_checkpointing", "quantize", "offload_activations", "chunked_ce")   # their own help group
# `options` are the method-option flags (`cli.method_flags`).
NOT_FLAGS = ("options",)
# Shared flags that each command handles itself; the other shared flags are the run's settings (what compare
# passes on to every row's `memtune train`, under a preset's values).
NOT_SETTINGS = ("model", "task", "progress")


def _train_args():
    from ..train import TrainArgs

    return TrainArgs


def shared_fields() -> list[str]:
    """The TrainArgs fields that are flags of both train and compare, in declaration order."""
    skip = {*TRAIN_ONLY, *TECHNIQUES, *NOT_FLAGS}
    return [f.name for f in dataclasses.fields(_train_args()) if f.name not in skip]


def setting_fields() -> list[str]:
    return [name for name in shared_fields() if name not in NOT_SETTINGS]


def add_run_flags(parser) -> None:
    """The shared flags, then the memory techniques in a group of their own."""
    add_field_flags(parser, _train_args(), shared_fields())
    techniques = parser.add_argument_group("memory techniques (any method where they make sense; compare: every row)")
    add_field_flags(techniques, _train_args(), TECHNIQUES)


def run_settings(ns, preset: dict | None = None) -> dict:
    """The settings given on the command line, over the preset's (field name → value)."""
    return {**(preset or {}), **given(ns, setting_fields())}

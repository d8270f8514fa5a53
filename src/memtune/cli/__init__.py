"""`memtune train | eval | compare | plan | predict | merge`: the command line, one module per command.

Each command module has `add_parser(sub)`, which registers its flags and its handler (`handler(ns) -> exit
code`). Bad input (unknown model/task/method, a bad option value, malformed data, a checkpoint for another
model) prints one line `memtune: error: ...` and exits with code 2, before anything is written.
A full disk also exits with code 2 (one line naming the folder and the bytes needed); a run that fails
while training (NaN loss) exits with code 1. Both keep the last checkpoint.
"""
from __future__ import annotations

import argparse
import sys

from . import compare, merge, plan, predict, train
from . import eval as eval_command

COMMANDS = (train, eval_command, compare, plan, predict, merge)      # in the order `memtune --help` lists them


def _user_errors():
    from ..assets import AssetMissing
    from ..atomic import DiskFullError
    from ..backbones import UnsupportedModel
    from ..checkpoint import CheckpointError
    from ..data import TaskError
    from ..methods import ConfigError
    from ..models import ModelError
    from ..train import ArgumentError

    # A full disk is the user's to fix (free space, then --resume): exit 2 like bad input, nothing lost.
    return (ConfigError, TaskError, ModelError, ArgumentError, CheckpointError, UnsupportedModel, AssetMissing,
            DiskFullError)


def _runtime_errors():
    from ..train import TrainingError

    return (TrainingError,)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memtune", description="Memory-efficient fine-tuning, measured.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    import logging

    # bitsandbytes warns on import when an optional CPU kernel package is missing: noise before the one line
    # that bad input gets (its errors still show).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    ns = build_parser().parse_args(argv)
    try:
        return ns.handler(ns)
    except _user_errors() as e:
        print(f"memtune: error: {e}", file=sys.stderr)
        return 2
    except _runtime_errors() as e:
        print(f"memtune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("memtune: interrupted", file=sys.stderr)
        return 130

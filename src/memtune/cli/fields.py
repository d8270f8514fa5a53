"""Command-line flags generated from dataclass fields, so that each setting is declared once, on its dataclass.

A field `name` becomes the flag `--name` (underscores as dashes) with
    type      the annotation: int, float or str (`X | None` reads as X)
    choices   `metadata["choices"]`, if the field has them
    help      `metadata["help"]`, if the field has it
    required  when the field has no default
A bool field that defaults to False becomes the switch `--name`; one that defaults to True becomes the switch
`--no-name`, and its help describes `--no-name`. A flag that is not given parses as None (unless the command
sets a default of its own), so `given(ns, names)` holds exactly what the user chose and the dataclass's own
defaults fill in the rest.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing


def _field(cls, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


@functools.cache
def _type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def value_type(cls, name: str) -> type:
    """The field's annotation without its `| None`."""
    hint = _type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint, = (a for a in typing.get_args(hint) if a is not type(None))
    return hint


def field_help(cls, name: str) -> str | None:
    return _field(cls, name).metadata.get("help")


def flag_of(cls, name: str) -> str:
    """`--name`, or `--no-name` for a bool field that is on by default."""
    dashed = name.replace("_", "-")
    on_by_default = value_type(cls, name) is bool and _field(cls, name).default is True
    return f"--no-{dashed}" if on_by_default else f"--{dashed}"


def add_field_flags(parser, cls, names, **overrides) -> None:
    """One flag per field of `cls` in `names`, in that order. `overrides[name]` holds argparse keywords that
    replace what the field says, and `flag` for a flag name other than the field's."""
    for name in names:
        f = _field(cls, name)
        extra = dict(overrides.get(name, {}))
        flag = extra.pop("flag", flag_of(cls, name))
        kwargs = {"dest": name, "default": None, "help": f.metadata.get("help")}
        if value_type(cls, name) is bool:
            kwargs["action"] = "store_false" if f.default is True else "store_true"
        else:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            kwargs.update(type=value_type(cls, name), choices=f.metadata.get("choices"), required=required)
        parser.add_argument(flag, **{**kwargs, **extra})


def given(ns, names) -> dict:
    """The fields in `names` whose flags were given (or have a command default): field name → value."""
    return {name: getattr(ns, name) for name in names if getattr(ns, name) is not None}


def as_flags(cls, values: dict) -> list[str]:
    """The command-line flags that `add_field_flags` parses back into `values` (field name → value)."""
    flags: list[str] = []
    for name, value in values.items():
        if value_type(cls, name) is not bool:
            flags += [flag_of(cls, name), str(value)]
        elif value != _field(cls, name).default:
            flags.append(flag_of(cls, name))
    return flags

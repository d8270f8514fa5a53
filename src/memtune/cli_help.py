"""`memtune train --help` text, taken from the method configs themselves.

The method list shows each config class docstring's first line; a method-option flag lists the methods
that have the option, each with its description from that config's docstring, where options are
documented as a two-column list (`name   what it does`, continuation lines indented further):

    r                 reduction factor: side width d' = d/r, ...
    lam, beta         coupling factors; None takes ...
    cache_*           the trunk cache ...
"""
from __future__ import annotations

import dataclasses
import inspect
import re

# "name", "a, b" or "prefix_*", then two or more spaces, then the description.
_ENTRY = re.compile(r"^(?P<indent>\s*)(?P<names>[a-z_][a-z0-9_]*\*?(?:, [a-z_][a-z0-9_]*\*?)*)\s{2,}(?P<text>\S.*)$")


def first_line(cls) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


def documented_options(cls) -> dict[str, str]:
    """Option name (or `prefix_*`) → its description, from the docstrings of `cls` and its bases."""
    found: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        doc = klass.__dict__.get("__doc__")
        if not doc:
            continue
        entries: list[tuple[list[str], list[str], int]] = []
        for line in inspect.cleandoc(doc).splitlines():
            m = _ENTRY.match(line)
            if m and (not entries or len(m["indent"]) <= entries[-1][2]):
                entries.append(([n.strip() for n in m["names"].split(",")], [m["text"].strip()], len(m["indent"])))
            elif entries and line.strip() and len(line) - len(line.lstrip()) > entries[-1][2]:
                entries[-1][1].append(line.strip())     # continuation of the previous entry
            elif entries and not line.strip():
                continue
            elif entries:
                entries.append(([], [], entries[-1][2]))  # prose ends the list entry before it
        for names, text, _ in entries:
            for name in names:
                found[name] = " ".join(text)
    return found


def _sentence(text: str, limit: int = 160) -> str:
    """The first sentence (up to a '.' or ';' outside parentheses) of a description, at most `limit` chars."""
    depth, end = 0, len(text)
    for i, ch in enumerate(text):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch in ".;" and depth <= 0 and (i + 1 == len(text) or text[i + 1] == " "):
            end = i + (ch == ".")
            break
    text = text[:end].rstrip(" ;,")
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def option_help(option: str, methods: list[str], registry: dict) -> str:
    """`[applies to: a, b] a: description (default x). b: ...` for one method-option flag."""
    parts = []
    for method in methods:
        cls = registry[method]
        docs = documented_options(cls)
        field = next(f for f in dataclasses.fields(cls) if f.name == option)
        default = field.default if field.default is not dataclasses.MISSING else None
        text = docs.get(option) or next((t for k, t in docs.items() if k.endswith("*") and option.startswith(k[:-1])),
                                        "")
        type_name = getattr(field.type, "__name__", None) or str(field.type)
        parts.append((method, _sentence(text) if text else type_name, default))
    # Methods that describe the option alike are listed together.
    grouped: dict[tuple[str, object], list[str]] = {}
    for method, text, default in parts:
        grouped.setdefault((text, default), []).append(method)
    if len(grouped) == 1:                           # every method describes it alike: no per-method prefix
        (text, default), = grouped
        return f"[applies to: {', '.join(methods)}] {text} (default {default})"
    described = [f"{', '.join(ms)}: {text} (default {default})"
                 for (text, default), ms in grouped.items()]
    return f"[applies to: {', '.join(methods)}] " + "; ".join(described)


def methods_listing(registry: dict) -> str:
    width = max(len(name) for name in registry)
    return "methods (--method):\n" + "\n".join(f"  {name:<{width}}  {first_line(cls)}" for name, cls in registry.items())

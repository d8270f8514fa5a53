"""Which method runs on which model family: the support matrix, derived from what each method requires and
what each backbone declares (README.md shows it between `<!-- support:start -->` and `<!-- support:end -->`;
`python -m memtune.support` prints it)."""
from __future__ import annotations

from .backbones import FAMILIES
from .methods import METHODS


def family_model_types() -> dict[str, list[str]]:
    """Family name → the Hugging Face model types it covers, in registry order."""
    out: dict[str, list[str]] = {}
    for model_type, cls in FAMILIES.items():
        out.setdefault(cls.family, []).append(model_type)
    return out


def support_matrix_markdown() -> str:
    families = family_model_types()
    rows = ["| method | " + " | ".join(f"{f} ({', '.join(types)})" for f, types in families.items()) + " |",
            "|---|" + "---|" * len(families)]
    for name, config in METHODS.items():
        ok = set(config.supported_families())
        rows.append(f"| `{name}` | " + " | ".join("✓" if f in ok else "–" for f in families) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(support_matrix_markdown())

"""The README's support matrix is the one the code derives (methods' requirements × backbones' capabilities)."""
from pathlib import Path

import memtune
from memtune.support import family_model_types, support_matrix_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_shows_the_generated_support_matrix():
    text = README.read_text()
    shown = text.split("<!-- support:start -->", 1)[1].split("<!-- support:end -->", 1)[0].strip()
    assert shown == support_matrix_markdown(), "regenerate it: python -m memtune.support"


def test_matrix_follows_requirements_and_capabilities():
    families = list(family_model_types())
    lines = support_matrix_markdown().splitlines()[2:]
    assert len(lines) == len(memtune.METHODS)
    dtl = next(line for line in lines if line.startswith("| `dtl` |"))
    cells = [c.strip() for c in dtl.strip("|").split("|")][1:]
    # DTL needs one bidirectional encoder stack: the encoder families (no decoder, no encoder-decoder).
    encoders = ("bert", "vit", "distilbert", "modernbert", "deberta-v2", "swin", "clip-vision", "siglip-vision")
    assert dict(zip(families, cells)) == {f: ("✓" if f in encoders else "–") for f in families}

"""A self-contained character-level WordPiece tokenizer for the tiny test models (no files to download)."""
from __future__ import annotations

import string
import tempfile
from functools import lru_cache
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = string.ascii_lowercase + string.digits + string.punctuation


@lru_cache(maxsize=1)
def char_tokenizer():
    """BertTokenizerFast whose vocab is the specials, single characters and '##'+character (~200 ids).

    WordPiece falls back to characters, so any lower-cased ASCII text tokenizes with no unknowns.
    """
    from transformers import BertTokenizerFast

    vocab = SPECIALS + list(CHARS) + ["##" + c for c in CHARS]
    folder = Path(tempfile.mkdtemp(prefix="memtune-chartok-"))
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)


VOCAB_SIZE = len(SPECIALS) + 2 * len(CHARS)

"""A self-contained character-level WordPiece tokenizer for the tiny test models (no files to download)."""
from __future__ import annotations

import string
from functools import lru_cache

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CHARS = string.ascii_lowercase + string.digits + string.punctuation


@lru_cache(maxsize=1)
def char_tokenizer():
    """BertTokenizerFast whose vocab is the specials, single characters and '##'+character (~200 ids).

    WordPiece falls back to characters, so any lower-cased ASCII text tokenizes with no unknowns.
    """
    from transformers import BertTokenizerFast

    vocab = SPECIALS + list(CHARS) + ["##" + c for c in CHARS]
    # The vocabulary as a dict: transformers 5 ignores `vocab_file` here and would keep only the specials.
    return BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)


VOCAB_SIZE = len(SPECIALS) + 2 * len(CHARS)

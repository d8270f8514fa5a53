"""The tiny models' character tokenizer: every lower-cased ASCII text tokenizes with no unknown token."""
from memtune.tokenizer import CHARS, VOCAB_SIZE, char_tokenizer


def test_every_character_has_its_own_id_and_nothing_is_unknown():
    tok = char_tokenizer()
    assert len(tok) == VOCAB_SIZE
    ids = tok("A cat, 42 dogs!")["input_ids"]
    assert tok.unk_token_id not in ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    singles = [tok(c, add_special_tokens=False)["input_ids"] for c in CHARS]
    assert all(len(s) == 1 for s in singles) and len({s[0] for s in singles}) == len(CHARS)
    assert tok("a good film")["input_ids"] != tok("a bad film")["input_ids"]

"""`memtune predict`: class names and probabilities of a trained adapter on new inputs (`memtune.predict`)."""
from __future__ import annotations


def add_parser(sub) -> None:
    from ..predict import cmd_predict

    p = sub.add_parser("predict", help="class names and probabilities of a saved adapter on new inputs")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--text", action="append", default=[], help="a text to classify (repeatable)")
    p.add_argument("--image", action="append", default=[], help="an image file to classify (repeatable)")
    p.add_argument("--file", default=None, help="one input per line (texts, or image paths for an image adapter), "
                                                "or a .csv/.jsonl file with a text column")
    p.add_argument("--text-pair", action="append", default=[], help="the second text of the --text given at the "
                   "same position, for a sentence-pair adapter (repeatable)")
    p.add_argument("--text-column", default="text", help="column of --file .csv/.jsonl holding the text, or two "
                   "comma-separated columns (sentence1,sentence2) for sentence pairs")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.set_defaults(handler=cmd_predict)

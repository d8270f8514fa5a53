"""`memtune merge`: fold a trained adapter into a standalone transformers checkpoint (`memtune.merge`)."""
from __future__ import annotations


def add_parser(sub) -> None:
    from ..merge import MERGEABLE, cmd_merge

    p = sub.add_parser("merge", help=f"fold a {'/'.join(MERGEABLE)} adapter into a standalone transformers "
                                     "checkpoint")
    p.add_argument("--model", required=True, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True, help="folder with adapter_config.json + adapter_model.safetensors")
    p.add_argument("--out", required=True, help="folder to write the merged checkpoint into (must be empty or new)")
    p.set_defaults(handler=cmd_merge)

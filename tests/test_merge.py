"""`memtune merge`: a standalone transformers checkpoint whose logits equal the adapter's; a clear refusal
for methods that cannot be folded into the base weights."""
import json

import pytest
import torch
from safetensors.torch import load_file

import memtune
from memtune.cli import main

TEXTS = ["a short text", "another example, a little longer than the first one", "z"]


def trained_adapter(folder, method, model="tiny-bert", **kw):
    """An adapter whose trainable weights moved away from their init (LoRA's B starts at zero)."""
    torch.manual_seed(0)
    wrapped = memtune.wrap(memtune.load_model(model), method, **kw)
    with torch.no_grad():
        for _, p in wrapped.trainable_named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    wrapped.save_pretrained(folder)
    return folder


def tokenized(tokenizer):
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.parametrize("method", ["lora", "ia3", "bitfit", "full", "linear"])
def test_merged_classifier_loads_with_transformers_and_gives_the_adapters_logits(method, tmp_path, capsys):
    from transformers import AutoModel, AutoTokenizer

    adapter = trained_adapter(tmp_path / "adapter", method, num_labels=3, label_names=["neg", "neu", "pos"])
    out = tmp_path / "merged"
    assert main(["merge", "--model", "tiny-bert", "--adapter", str(adapter), "--out", str(out)]) == 0
    capsys.readouterr()

    # What a transformers user does, following memtune_head.json: no memtune code involved.
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"} and config["label2id"]["pos"] == 2
    assert "mean over tokens" in json.loads((out / "memtune_head.json").read_text())["pooling"]
    encoder = AutoModel.from_pretrained(out).eval()
    head = load_file(str(out / "memtune_head.safetensors"))
    batch = tokenized(AutoTokenizer.from_pretrained(out))
    with torch.no_grad():
        h = encoder(**batch).last_hidden_state                             # B×T×d
        mask = batch["attention_mask"].unsqueeze(-1).float()               # B×T×1
        logits = ((h * mask).sum(1) / mask.sum(1)) @ head["weight"].T + head["bias"]
        expected = memtune.load("tiny-bert", adapter).eval()(**batch).logits
    if method != "linear":
        assert "lora_" not in str(list(encoder.state_dict())) and "ia3_" not in str(list(encoder.state_dict()))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    # The merge changed the encoder (except for a linear probe, whose encoder is the base model's).
    base = memtune.load_model("tiny-bert").model.eval()
    with torch.no_grad():
        moved = (base(**batch).last_hidden_state - h).abs().max().item()
    # (linear: equal up to float32 rounding; the reload may pick another attention kernel than the tiny model's)
    assert (moved < 1e-5) if method == "linear" else (moved > 1e-3), moved


def test_merged_causal_lm_loads_as_a_causal_lm(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    adapter = trained_adapter(tmp_path / "adapter", "lora", model="tiny-llama")
    out = tmp_path / "merged"
    assert main(["merge", "--model", "tiny-llama", "--adapter", str(adapter), "--out", str(out)]) == 0
    lm = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(5, 60, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = memtune.load("tiny-llama", adapter).eval()(input_ids=ids).logits
        torch.testing.assert_close(lm(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    assert not (out / "memtune_head.safetensors").exists()


@pytest.mark.parametrize("method, why", [("adapter", "GELU between the two projections"),
                                         ("lst", "computation is not the base architecture"),
                                         ("dtl", "computation is not the base architecture")])
def test_methods_that_cannot_be_merged_say_why(method, why, tmp_path, capsys):
    adapter = trained_adapter(tmp_path / "adapter", method, num_labels=2)
    out = tmp_path / "merged"
    assert main(["merge", "--model", "tiny-bert", "--adapter", str(adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"memtune: error: cannot merge {method!r}") and why in err[0], err
    assert not out.exists()


def test_merge_refuses_a_used_out_folder(tmp_path, capsys):
    adapter = trained_adapter(tmp_path / "adapter", "lora", num_labels=2)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", "--model", "tiny-bert", "--adapter", str(adapter), "--out", str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"

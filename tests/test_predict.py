"""`memtune predict`: label names and probabilities of a saved adapter on new inputs."""
import json

import numpy as np
import pytest
import torch

import memtune
from memtune.cli import main
from memtune.data import make_collate
from memtune.train import TrainArgs, train


@pytest.fixture(scope="module")
def text_adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    csv = d / "task.csv"
    csv.write_text("text,label\n" + "".join(f"{'good great' if i % 2 else 'bad awful'} {i},{'pos' if i % 2 else 'neg'}\n"
                                            for i in range(40)))
    train(TrainArgs(model="tiny-bert", task=f"csv:{csv}", method="lora", out=str(d / "run"), max_steps=4,
                    batch_size=8, max_length=24, progress=False))
    return d / "run"


def reference_probabilities(adapter, texts, max_length=24):
    model = memtune.load("tiny-bert", adapter).eval()
    batch = make_collate("text", memtune.load_model("tiny-bert").preprocessor, max_length=max_length)(
        [{"text": t, "label": 0} for t in texts])
    batch.pop("labels")
    with torch.no_grad():
        return torch.softmax(model(**batch).logits, -1)


def test_predict_prints_label_names_and_the_adapters_probabilities(text_adapter, capsys):
    texts = ["good great film", "bad awful " * 40]             # the second is cut at the saved max_length 24
    assert main(["predict", "--model", "tiny-bert", "--adapter", str(text_adapter), "--text", texts[0],
                 "--text", texts[1], "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    expected = reference_probabilities(text_adapter, texts)
    assert [r["input"] for r in rows] == texts
    for row, probs in zip(rows, expected):
        assert set(row["probabilities"]) == {"neg", "pos"}
        assert row["probabilities"]["neg"] == pytest.approx(probs[0].item(), abs=1e-6)
        assert row["probabilities"]["pos"] == pytest.approx(probs[1].item(), abs=1e-6)
        assert row["label"] == ["neg", "pos"][int(probs.argmax())]


@pytest.mark.parametrize("kind", ["lines", "csv", "jsonl"])
def test_predict_reads_a_file(kind, text_adapter, tmp_path, capsys):
    texts = ["good great", "bad awful thing"]
    f = tmp_path / {"lines": "in.txt", "csv": "in.csv", "jsonl": "in.jsonl"}[kind]
    if kind == "lines":
        f.write_text("\n".join(texts) + "\n")
    elif kind == "csv":
        f.write_text("id,review\n" + "".join(f"{i},{t}\n" for i, t in enumerate(texts)))
    else:
        f.write_text("".join(json.dumps({"review": t}) + "\n" for t in texts))
    extra = [] if kind == "lines" else ["--text-column", "review"]
    assert main(["predict", "--model", "tiny-bert", "--adapter", str(text_adapter), "--file", str(f), *extra]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    expected = reference_probabilities(text_adapter, texts)
    for line, text, probs in zip(lines, texts, expected):
        label, p, others, shown = line.split("\t")
        assert shown == text and label == ["neg", "pos"][int(probs.argmax())]
        assert float(p) == pytest.approx(probs.max().item(), abs=1e-4)
    assert len(lines) == 2


def test_predict_refuses_a_causal_lm_adapter(tmp_path, capsys):
    model = memtune.wrap(memtune.load_model("tiny-llama"), "lora")
    model.save_pretrained(tmp_path / "lm")
    assert main(["predict", "--model", "tiny-llama", "--adapter", str(tmp_path / "lm"), "--text", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "causal-LM adapter" in err[0], err


def test_predict_with_nothing_to_predict_is_refused(text_adapter, capsys):
    assert main(["predict", "--model", "tiny-bert", "--adapter", str(text_adapter)]) == 2
    assert "nothing to predict" in capsys.readouterr().err


def test_predict_on_images(tmp_path, capsys):
    from PIL import Image

    torch.manual_seed(0)
    model = memtune.wrap(memtune.load_model("tiny-vit"), "linear", num_labels=3, label_names=["cat", "dog", "owl"])
    model.save_pretrained(tmp_path / "img")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    assert main(["predict", "--model", "tiny-vit", "--adapter", str(tmp_path / "img"), "--image", str(paths[0]),
                 "--image", str(paths[1]), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    loaded = memtune.load_model("tiny-vit")
    batch = make_collate("image", loaded.preprocessor)([{"image": np.asarray(Image.open(p)), "label": 0} for p in paths])
    with torch.no_grad():
        expected = torch.softmax(memtune.load(loaded, tmp_path / "img").eval()(pixel_values=batch["pixel_values"]).logits, -1)
    for row, probs in zip(rows, expected):
        assert list(row["probabilities"]) == ["cat", "dog", "owl"]
        assert [row["probabilities"][n] for n in ("cat", "dog", "owl")] == pytest.approx(probs.tolist(), abs=1e-6)

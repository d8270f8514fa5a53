"""Real weights and real data: pretrained MiniLM + LoRA beats the same architecture with random weights."""
from memtune.train import TrainArgs, train

from .conftest import requires_minilm, requires_rotten_tomatoes


@requires_minilm()
@requires_rotten_tomatoes()
def test_pretrained_minilm_lora_beats_random_weights_and_chance(tmp_path, monkeypatch, real_model_threads):
    import memtune.models as models

    common = dict(task="rotten-tomatoes", method="lora", max_steps=150, batch_size=16, max_length=48,
                  train_limit=2400, test_limit=600, progress=False, seed=0, eval_batch_size=100)
    real = train(TrainArgs(model="minilm", out=str(tmp_path / "real"), **common))

    # The same shape with random weights: re-initialise every weight after loading.
    original = models._load_pretrained

    def randomised(*a, **k):
        loaded = original(*a, **k)
        loaded.model.init_weights() if hasattr(loaded.model, "init_weights") else None
        for mod in loaded.model.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
        return loaded

    monkeypatch.setattr(models, "_load_pretrained", randomised)
    rand = train(TrainArgs(model="minilm", out=str(tmp_path / "rand"), **common))
    assert real["accuracy"] >= 0.70, real["accuracy"]
    assert real["accuracy"] > rand["accuracy"] + 0.05, (real["accuracy"], rand["accuracy"])

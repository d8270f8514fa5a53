"""`memtune plan` on image-text compositions (VISION+TEXT) and LST's CLIP-T5 paper form (specs/vl.md §2, §5.9).

The paper form is `clip-rn101-grid+t5-base-vl`: pre-extracted 2048-d CLIP RN101 grid features (no vision encoder
in the step) beside T5-base with the 32,200-token vocabulary. The agreement tests model the CPU, so the plan must
equal what `measure_training_memory` sees for the same step here (test_plan.py's helpers).
"""
import json

import pytest
import torch

from memtune.backbones.image_text import ImageTextConfig
from memtune.cli import main as cli_main
from memtune.memory.known_configs import known_models, known_visual_sources, resolve_config
from memtune.memory.measure import measure_training_memory
from memtune.memory.paper_values import official_visual_mlp_params
from memtune.memory.plan import PlanSettings, plan
from memtune.memory.plan_step import build_planned_model, make_batch, make_optimizer
from memtune.memory.real_step import real_batch
from memtune.memory.visual_features import VisualFeaturesConfig
from memtune.methods import ConfigError
from memtune.models import ModelError

from .test_plan import TOLERANCE, assert_agrees

PAPER = "clip-rn101-grid+t5-base-vl"
BACKBONE = 222_958_848            # T5-base at vocabulary 32,200 (32,128 + 72 rows of 768)


def pct_of_all(trainable: int, frozen: int) -> float:
    """The official VL code's "% updated": trainable / (frozen backbone + trainable)."""
    return round(100 * trainable / (frozen + trainable), 2)


# -- §5.9: the CLIP-T5-base counts ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paper_rows():
    # Counts do not depend on the batch: plan a small one.
    result = plan(PlanSettings(model=PAPER, batch_size=2, max_length=20, objective="seq2seq", target_length=4),
                  "lst:r=4,lst:r=8")
    return {m.label: m for m in result.methods}


def test_the_paper_form_is_two_known_names():
    config, source = resolve_config(PAPER)
    assert isinstance(config, ImageTextConfig) and config.grid == 6
    assert isinstance(config.vision_config, VisualFeaturesConfig)
    assert (config.vision_config.hidden_size, config.vision_config.grid) == (2048, (7, 7))
    assert config.text_config.vocab_size == 32_200
    assert {k: v for k, v in config.text_config.to_dict().items() if k != "vocab_size"} == \
        {k: v for k, v in resolve_config("t5-base")[0].to_dict().items() if k != "vocab_size"}
    assert "clip-rn101-grid" in known_visual_sources() and "clip-rn101-grid" not in known_models()
    assert "t5-base-vl" in known_models()


def test_clip_t5_r4_side_network_visual_mlp_and_percent(paper_rows):
    m = paper_rows["lst:r=4"]
    assert m.status == "ok", m.message
    assert m.pretrained_params == BACKBONE                       # the feature source has no parameters
    assert m.trainable_params - m.visual_params == 16_386_072     # the side network (lst.md §9, a = 192)
    assert official_visual_mlp_params(2048, 768) == 1_581_312    # (f + 11)·d
    assert m.official_trainable_params == 17_967_384
    assert pct_of_all(m.official_trainable_params, BACKBONE) == 7.46
    assert m.paper_pct == 7.46 and "Table 3" in m.paper_source
    # The planned %: every parameter of the wrapped model is the base (trainable included).
    assert m.pct_of == "all" and m.total_params == BACKBONE + m.trainable_params
    assert m.trainable_pct == pytest.approx(100 * m.trainable_params / m.total_params, rel=1e-12)


def test_clip_t5_r8(paper_rows):
    m = paper_rows["lst:r=8"]
    assert m.trainable_params - m.visual_params == 5_097_240      # the side network at d' = 96
    assert m.official_trainable_params == 6_678_552               # + the official visual MLP
    assert pct_of_all(m.official_trainable_params, BACKBONE) == 2.91
    assert m.paper_pct is None                                    # not the paper's setting (r = 4)


def test_the_paper_value_needs_the_papers_objective():
    m = plan(PlanSettings(model=PAPER, batch_size=2, max_length=8), "lst:r=4").methods[0]   # classification
    assert m.paper_pct is None and m.official_trainable_params == 17_967_384 + 2 * 768 + 2   # + the head


def test_the_pre_extracted_features_are_an_input_and_no_vision_compute():
    r = plan(PlanSettings(model=PAPER, batch_size=3, max_length=20), "lst:r=4").methods[0]
    text = plan(PlanSettings(model="t5-base-vl", batch_size=3, max_length=20), "lst:r=4").methods[0]
    features = 3 * 49 * 2048 * 4                                  # B×L×f fp32
    assert r.input_bytes - text.input_bytes == features
    assert r.parameter_bytes - text.parameter_bytes == 4 * r.visual_params   # only the visual embedding is new


# -- the CLI ------------------------------------------------------------------------------------------------------
def test_cli_plans_a_vision_text_composition(capsys, tmp_path):
    path = tmp_path / "plan.json"
    code = cli_main(["plan", "--model", "clip-vit-b16+t5-base", "--methods", "full,lora,lst", "--batch-size", "4",
                     "--max-length", "20", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 0
    d = json.loads(path.read_text())
    rows = {m["label"]: m for m in d["methods"]}
    assert list(rows) == ["full", "lora", "lst"] and all(m["status"] == "ok" for m in rows.values())
    assert rows["lst"]["peak_bytes"] < rows["full"]["peak_bytes"]
    assert rows["lora"]["peak_bytes"] < rows["full"]["peak_bytes"]
    assert d["model"]["modality"] == "image_text" and d["model"]["visual_tokens"] == 36
    assert d["model"]["num_layers"] == 12 and d["model"]["tokens"] == 20
    assert "length 20 + 36 visual tokens" in out
    for label in rows:
        assert any(line.split()[:1] == [label] for line in out.splitlines()), label


def test_cli_prints_the_paper_percent_next_to_lst(capsys):
    code = cli_main(["plan", "--model", PAPER, "--methods", "lora+gc,lst:r=4", "--batch-size", "2",
                     "--max-length", "20", "--objective", "seq2seq", "--target-length", "4"])
    out = capsys.readouterr().out
    assert code == 0
    head = next(line for line in out.splitlines() if line.startswith("method"))
    assert head.split()[:4] == ["method", "trainable", "%", "paper"]
    lst = next(line for line in out.splitlines() if line.startswith("lst:r=4 "))
    assert lst.split()[3] == "7.46"
    lora = next(line for line in out.splitlines() if line.startswith("lora+gc "))
    assert lora.split()[3] == "-"
    assert "17,967,384 = 7.46 % of all parameters" in out
    assert "pre-extracted 2048-d features on a 7×7 grid" in out


# -- plan vs the CPU tracker --------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size", [None, 48])
def test_plan_matches_measurement_on_a_tiny_composition(image_size):
    # image_size is the vision part's (tiny-vit's default 32; 48 px gives it more patches to pool to 6×6).
    settings = PlanSettings(model="tiny-vl-t5", batch_size=2, max_length=16, device="cpu", image_size=image_size)
    assert assert_agrees(settings, "full,lora,lst") == 3


def test_the_image_size_is_the_vision_parts():
    small, large = (plan(PlanSettings(model="tiny-vl-t5", batch_size=2, max_length=16, image_size=s), "full")
                    .methods[0] for s in (32, 64))
    assert large.input_bytes - small.input_bytes == 2 * 3 * (64 ** 2 - 32 ** 2) * 4     # B×3×S×S fp32 pixels
    assert large.peak_bytes > small.peak_bytes and large.trainable_params == small.trainable_params


def test_plan_matches_measurement_over_pre_extracted_features():
    """A tiny feature source (f = 48 on a 7×7 grid) beside tiny-t5, built with real weights on the CPU."""
    config = ImageTextConfig(VisualFeaturesConfig(48, (7, 7)), resolve_config("tiny-t5")[0], 6, "features+tiny-t5")
    settings = PlanSettings(model="features+tiny-t5", batch_size=2, max_length=16, device="cpu")
    result = plan(settings, "lora,lst", config=config, source="test")
    for mp in result.methods:
        torch.manual_seed(0)
        model, _ = build_planned_model(config, settings, mp.method, mp.options, device="cpu")
        batch = real_batch(make_batch(model, settings, settings.batch_size))
        assert batch["pixel_values"].shape == (2, 49, 48)           # the features, where the image would be
        real = measure_training_memory(model, batch, make_optimizer(model, settings), warmup=2)
        assert abs(mp.peak_bytes / real.peak_bytes - 1) <= TOLERANCE, (mp.label, mp.peak_bytes, real.peak_bytes)
        assert abs(mp.activation_peak_bytes / real.activation_peak_bytes - 1) <= TOLERANCE, mp.label
        assert mp.parameter_bytes == real.static["parameters"]


def test_depth_extrapolation_extrapolates_the_text_blocks():
    kw = dict(model="clip-rn101-grid+t5-small", batch_size=4, max_length=20)
    full = plan(PlanSettings(**kw), "lora,lst")
    fast = plan(PlanSettings(**kw, layers=2), "lora,lst")
    for a, b in zip(full.methods, fast.methods):
        assert any("extrapolated" in n for n in b.notes)
        assert b.trainable_params == a.trainable_params
        assert abs(b.peak_bytes / a.peak_bytes - 1) < 0.01, (a.label, a.peak_bytes, b.peak_bytes)


# -- errors -------------------------------------------------------------------------------------------------------
def test_composition_errors_say_what_is_allowed():
    with pytest.raises(ModelError, match="not a model on its own: plan VISION"):
        resolve_config("clip-rn101-grid")
    with pytest.raises(ModelError, match="two model names joined by one"):
        resolve_config("clip-vit-b16+t5-base+bert-base")
    with pytest.raises(ModelError, match="'t5-base' must be an image model or a source of visual features"):
        resolve_config("t5-base+t5-base")
    with pytest.raises(ModelError, match="'vit-b16' must be a text model"):
        resolve_config("vit-b16+vit-b16")
    with pytest.raises(ConfigError, match="--image-size does not apply to .*pre-extracted features"):
        plan(PlanSettings(model=PAPER, batch_size=2, max_length=8, image_size=224), "lst")

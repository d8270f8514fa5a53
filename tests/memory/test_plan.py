"""`memtune plan`: the meta-device plan against real CPU measurements, speed and memory of planning, errors.

The agreement tests model the CPU (`device="cpu"`: per-parameter AdamW, CPU autocast lists), so the plan
must equal what `measure_training_memory` sees here; the GPU model (`device="cuda"`) is checked against an
H100 by benchmarks/plan_vs_cuda.py.
"""
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from memtune.cli import main as cli_main
from memtune.memory.known_configs import known_models, resolve_config
from memtune.memory.measure import measure_training_memory
from memtune.memory.plan import PlanSettings, plan
from memtune.memory.plan_step import build_planned_model
from memtune.memory.real_step import build_real_step
from memtune.methods import METHODS, ConfigError
from memtune.models import ModelError, model_from_config

from ..conftest import requires_minilm

B, L = 2, 16
TOLERANCE = 0.05            # the bound; the plans below agree to the byte in practice


def measure_real(settings, mp):
    """The same step on the real tiny model (or bundled weights), measured by `memtune.memory`."""
    step = build_real_step(settings, mp.method, mp.options)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if settings.precision.endswith("-amp") else None
    return measure_training_memory(step.model, step.batch, step.optimizer, warmup=2, autocast=autocast)


def assert_agrees(settings, methods):
    result = plan(settings, methods)
    checked = 0
    for mp in result.methods:
        if mp.status != "ok":
            continue
        real = measure_real(settings, mp)
        assert abs(mp.peak_bytes / real.peak_bytes - 1) <= TOLERANCE, (mp.label, mp.peak_bytes, real.peak_bytes)
        assert abs(mp.activation_peak_bytes / real.activation_peak_bytes - 1) <= TOLERANCE, \
            (mp.label, mp.activation_peak_bytes, real.activation_peak_bytes)
        assert mp.parameter_bytes == real.static["parameters"]
        assert mp.optimizer_bytes == real.static["optimizer"]
        checked += 1
    return checked


# -- plan vs measurement ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_plan_matches_measurement_for_every_method_on_tiny_bert(method):
    # Every registered method supports the BERT family; new methods are picked up automatically.
    assert assert_agrees(PlanSettings(model="tiny-bert", batch_size=B, max_length=L, device="cpu"), [method]) == 1


@pytest.mark.parametrize("model,methods", [
    ("tiny-t5", "full,lora,adapter,lst,sherl"),
    ("tiny-llama", "full,lora,ia3,lst,meft1"),
    ("tiny-vit", "full,bitfit,dtl,meft2"),
    ("tiny-dinov2", "linear,lora,sherl,meft3"),
])
def test_plan_matches_measurement_on_other_families(model, methods):
    settings = PlanSettings(model=model, batch_size=B, max_length=L, device="cpu")
    assert assert_agrees(settings, methods) >= 3


@pytest.mark.parametrize("precision,gc", [("bf16-amp", False), ("bf16", False), ("fp32", True)])
def test_plan_matches_measurement_with_amp_bf16_and_checkpointing(precision, gc):
    settings = PlanSettings(model="tiny-bert", batch_size=B, max_length=L, device="cpu", precision=precision,
                            gradient_checkpointing=gc)
    assert assert_agrees(settings, "full,lora,meft1") == 3


def test_gradient_checkpointing_is_reported_per_method_and_cuts_full_finetuning_activations():
    on = plan(PlanSettings(model="tiny-llama", batch_size=B, max_length=64, gradient_checkpointing=True),
              "full,lst,meft1")
    off = plan(PlanSettings(model="tiny-llama", batch_size=B, max_length=64), "full")
    status = {m.label: m.gradient_checkpointing for m in on.methods}
    assert status == {"full": "applied", "lst": "not needed", "meft1": "not supported"}
    assert on.methods[0].activation_peak_bytes < 0.7 * off.methods[0].activation_peak_bytes


@requires_minilm()
@pytest.mark.slow
@pytest.mark.parametrize("model,methods", [("minilm", "full,lora,lst,meft1"), ("dinov2-s", "full,dtl,sherl")])
def test_plan_matches_measurement_on_bundled_real_models(model, methods):
    settings = PlanSettings(model=model, batch_size=2, max_length=32, image_size=112, device="cpu") \
        if model == "dinov2-s" else PlanSettings(model=model, batch_size=2, max_length=32, device="cpu")
    try:
        assert assert_agrees(settings, methods) >= 3
    except ModelError as e:           # an asset that is not installed
        pytest.skip(str(e))


# -- the GPU model ---------------------------------------------------------------------------------------------
def test_gpu_model_uses_one_byte_dropout_masks_foreach_adam_and_fused_attention():
    cpu = plan(PlanSettings(model="tiny-bert", batch_size=4, max_length=64, device="cpu"), "full").methods[0]
    gpu = plan(PlanSettings(model="tiny-bert", batch_size=4, max_length=64, device="cuda"), "full").methods[0]
    # bool dropout masks instead of float ones: fewer saved bytes; the cuBLAS workspace is added to the start.
    assert gpu.saved_activation_bytes < cpu.saved_activation_bytes
    assert gpu.start_bytes - cpu.start_bytes == gpu.workspace_bytes > 0
    eager = plan(PlanSettings(model="tiny-llama", batch_size=4, max_length=128), "full").methods[0]
    sdpa = plan(PlanSettings(model="tiny-llama", batch_size=4, max_length=128, attn="sdpa"), "full").methods[0]
    assert sdpa.activation_peak_bytes < eager.activation_peak_bytes     # no B×H×T×T score maps kept


def test_precisions_order_the_peak():
    peaks = {p: plan(PlanSettings(model="tiny-llama", batch_size=4, max_length=64, precision=p), "full")
             .methods[0].peak_bytes for p in ("fp32", "bf16-amp", "fp16-amp", "bf16")}
    assert peaks["bf16"] < peaks["bf16-amp"] == peaks["fp16-amp"] < peaks["fp32"]


# -- largest batch, extrapolation -------------------------------------------------------------------------------
def test_largest_batch_fits_and_one_more_does_not():
    probe = plan(PlanSettings(model="tiny-bert", batch_size=4, max_length=32), "lora").methods[0]
    budget = int(probe.peak_bytes * 2.5)
    mp = plan(PlanSettings(model="tiny-bert", batch_size=4, max_length=32, budget_bytes=budget), "lora").methods[0]
    assert mp.fits and mp.max_batch_size > 4
    at = plan(PlanSettings(model="tiny-bert", batch_size=mp.max_batch_size, max_length=32), "lora").methods[0]
    above = plan(PlanSettings(model="tiny-bert", batch_size=mp.max_batch_size + 1, max_length=32), "lora").methods[0]
    assert at.peak_bytes == mp.max_batch_peak_bytes <= budget < above.peak_bytes


def test_depth_extrapolation_agrees_with_a_full_plan_on_a_mid_size_config():
    kw = dict(model="bert-base", batch_size=4, max_length=64)
    full = plan(PlanSettings(**kw), "full,lora,meft1")
    fast = plan(PlanSettings(**kw, layers=3), "full,lora,meft1")
    for a, b in zip(full.methods, fast.methods):
        assert any("extrapolated" in n for n in b.notes)
        assert abs(b.peak_bytes / a.peak_bytes - 1) < 0.01, (a.label, a.peak_bytes, b.peak_bytes)
        assert b.trainable_params == a.trainable_params


# -- no weights, speed ------------------------------------------------------------------------------------------
def test_meta_model_holds_no_storage():
    config, _ = resolve_config("t5-large")
    model, pretrained = build_planned_model(config, PlanSettings(model="t5-large"), "lora", {})
    assert pretrained > 700_000_000
    assert all(p.device.type == "meta" for p in model.parameters())


def test_a_3b_model_plans_within_the_machines_memory():
    # (How long it takes is a benchmark's business; the timeout only guards against a hang.)
    code = textwrap.dedent("""
        import json, resource
        from memtune.memory.plan import PlanSettings, plan
        r = plan(PlanSettings(model="t5-3b", batch_size=8, max_length=128), "lora")
        print(json.dumps({"peak": r.methods[0].peak_bytes,
                          "rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    d = json.loads(out.stdout.strip().splitlines()[-1])
    assert d["peak"] > 11 * 2 ** 30          # the plan is for 2.85B fp32 weights (about 10.6 GiB) and more
    assert d["rss_kib"] < 3 * 2 ** 20        # yet the planning process never held them (under 3 GiB)


def test_every_known_config_builds_with_the_expected_size():
    sizes = {"t5-base": 222.9e6, "bert-base": 109.5e6, "llama-7b": 6.74e9, "llama-3-8b": 8.03e9, "vit-b16": 86.4e6,
             "minilm": 22.7e6, "smollm2-135m": 134.5e6}
    for name in known_models():
        config, source = resolve_config(name)
        if name in sizes:
            with torch.device("meta"):
                hf = model_from_config(config)
            n = sum(p.numel() for p in hf.parameters())
            assert abs(n / sizes[name] - 1) < 0.01, (name, n)
    for required in ("t5-base", "t5-large", "t5-3b", "bert-base", "bert-large", "roberta-large", "vit-b16", "vit-l16",
                     "llama-7b", "llama-3-8b", "minilm", "mpnet-base", "dinov2-s", "smollm2-135m", "tiny-bert"):
        assert required in known_models()


def test_hub_names_resolve_to_the_shipped_configs_without_the_network():
    from memtune.memory.known_configs import SYNONYMS

    for hub_name, shipped in SYNONYMS.items():
        config, source = resolve_config(hub_name)
        assert shipped in source, (hub_name, source)
        assert config.to_dict() == resolve_config(shipped)[0].to_dict()


def test_every_family_answers_the_planner_from_its_config_alone():
    from transformers import XLNetConfig

    from memtune.backbones import UnsupportedModel, family_class

    for name in known_models():
        config, _ = resolve_config(name)
        family = family_class(config)                   # the class: no model is built
        assert family.depth(config) >= 1 and set(family.size_fields(config.model_type)) <= set(config.to_dict())
        batch = family.planning_batch(config, 2, 8)
        assert set(batch) <= set(family.input_keys) and all(t.device.type == "meta" for t in batch.values())
        assert family.modality == ("image" if "pixel_values" in batch else "text")
    with pytest.raises(UnsupportedModel, match="model type 'xlnet' is not supported; supported model types: bart"):
        family_class(XLNetConfig())


def test_a_local_config_json_works(tmp_path):
    d = json.loads(open(resolve_config.__globals__["_config_dir"]() / "bert-base.json").read())
    d["num_hidden_layers"] = 2
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    for name in (str(path), str(tmp_path)):
        r = plan(PlanSettings(model=name, batch_size=2, max_length=16), "lora")
        assert r.num_layers == 2 and r.methods[0].status == "ok"


# -- errors -------------------------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    code = cli_main(["plan", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_unknown_model_is_a_clear_error(capsys):
    code, _, err = run_cli(capsys, "--model", "t5-bsae", "--methods", "lora")
    assert code == 2
    assert "unknown model 't5-bsae'" in err and "t5-base" in err


def test_config_missing_required_fields_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 512, "vocab_size": 1000}))
    code, _, err = run_cli(capsys, "--model", str(path))
    assert code == 2
    assert "missing: num_hidden_layers, num_attention_heads, intermediate_size" in err
    path.write_text(json.dumps({"hidden_size": 512}))
    assert "has no 'model_type'" in run_cli(capsys, "--model", str(path))[2]
    other = tmp_path / "xlnet.json"
    other.write_text(json.dumps({"model_type": "xlnet", "n_layer": 2}))
    assert "model type 'xlnet' is not supported" in run_cli(capsys, "--model", str(other))[2]


def test_bad_method_option_or_budget_is_a_clear_error(capsys):
    assert "unknown method 'loar'" in run_cli(capsys, "--model", "tiny-bert", "--methods", "full,loar")[2]
    assert "lora.r must be a positive integer" in run_cli(capsys, "--model", "tiny-bert", "--methods", "lora:r=0")[2]
    code, _, err = run_cli(capsys, "--model", "tiny-bert", "--budget", "lots")
    assert code == 2 and "--budget: cannot read 'lots'" in err
    with pytest.raises(ConfigError, match="applies to vision models"):
        plan(PlanSettings(model="tiny-bert", image_size=224), "lora")
    with pytest.raises(ConfigError, match="max length 600 exceeds the 512 positions"):
        plan(PlanSettings(model="roberta-large", max_length=600), "lora")


def test_a_budget_nothing_fits_says_so(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "--model", "tiny-llama", "--methods", "full,lora", "--batch-size", "4",
                           "--budget", "1MiB", "--json", str(tmp_path / "p.json"))
    assert code == 0
    assert "Nothing fits in 0.00 GiB, even at batch size 1" in out
    d = json.loads((tmp_path / "p.json").read_text())
    assert [m["max_batch_size"] for m in d["methods"]] == [0, 0]
    assert all(m["fits"] is False for m in d["methods"])


def test_cli_table_and_json(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "--model", "tiny-t5", "--methods", "full,bitfit,lora,lst", "--batch-size", "4",
                           "--max-length", "32", "--budget", "1GiB", "--json", str(tmp_path / "plan.json"))
    assert code == 0
    assert "bitfit" in out and "unsupported: bitfit: the t5 model 't5' has no bias terms" in out
    assert "Fits in 1.00 GiB at batch 4: full, lora, lst." in out
    d = json.loads((tmp_path / "plan.json").read_text())
    full = d["methods"][0]
    assert full["gib"]["peak"] == pytest.approx(full["peak_bytes"] / 2 ** 30)
    assert full["max_batch_size"] > 4 and d["settings"]["budget_bytes"] == 2 ** 30
    assert {"parameter_bytes", "gradient_bytes", "optimizer_bytes", "activation_peak_bytes", "peak_split"} <= set(full)


@pytest.mark.parametrize("text,expected", [("16GiB", 16 * 2 ** 30), ("24", 24 * 2 ** 30), ("16000MiB", 16000 * 2 ** 20),
                                           ("40GB", 40 * 10 ** 9), (" 1.5 gib ", int(1.5 * 2 ** 30))])
def test_budget_units(text, expected):
    from memtune.cli.plan import parse_budget

    assert parse_budget(text) == expected

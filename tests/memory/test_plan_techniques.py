"""`memtune plan` rows with memory techniques (lora+nf4+gc, sherl+int8, ...) against the CPU tracker.

The real step is the library's own: `memtune.wrap(..., techniques=...)` with bitsandbytes layers on this
CPU, measured by `memtune.memory.measure`; the plan models the CPU (`device="cpu"`) with its meta
stand-ins (`memtune.techniques.quantize_meta`). Bound: the issue's 5 %.
"""
import pytest
import torch

import memtune
from memtune.memory.measure import measure_training_memory
from memtune.memory.plan import PlanSettings, plan
from memtune.memory.plan_step import make_batch, make_optimizer
from memtune.memory.real_step import real_batch
from memtune.methods import ConfigError, config_for
from memtune.models import load_model
from memtune.techniques.quantize_meta import quantized_weight_bytes

from .test_plan import TOLERANCE

B, L = 2, 32


def measure_real(settings, mp):
    torch.manual_seed(0)
    loaded = load_model(settings.model)
    num_labels = None if loaded.model.config.model_type == "llama" else settings.num_labels
    model = memtune.wrap(loaded, config_for(mp.method, mp.options), num_labels=num_labels,
                         techniques=mp.techniques)
    model.train()
    batch = real_batch(make_batch(model, settings, settings.batch_size))
    return model, measure_training_memory(model, batch, make_optimizer(model, settings), warmup=2)


def real_quant_constant_bytes(model) -> int:
    """Bytes of bitsandbytes' quantization constants (absmax, code books, ...) in the model's layers."""
    import bitsandbytes as bnb

    total = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            parts = [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
            total += sum(t.numel() * t.element_size() for t in parts)
        elif isinstance(m, bnb.nn.Linear8bitLt):
            scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB   # moved to the state on first use
            total += scb.numel() * scb.element_size()
    return total


COMBINATIONS = [
    ("tiny-bert", "lora+gc,full+gc,sherl+gc,dtl+gc,adapter+gc"),
    ("tiny-bert", "lora+nf4,lora+nf4+gc,sherl+int8,lora+fp4,dtl+nf4"),
    ("tiny-bert", "lst+nf4"),
    ("tiny-llama", "lora+gc,full+gc,sherl+gc,ia3+gc"),
    ("tiny-llama", "lora+nf4,lora+nf4+gc,sherl+int8,sherl+nf4+gc"),
    ("tiny-llama", "lst+nf4"),
    ("tiny-llama", "lora+nf4+gc+chunked_ce,qst:side_checkpointing=true:downsample=avgpool+nf4+chunked_ce"),
]


@pytest.mark.parametrize("model,methods", COMBINATIONS)
def test_plan_with_techniques_matches_the_cpu_tracker(model, methods):
    settings = PlanSettings(model=model, batch_size=B, max_length=L, device="cpu")
    result = plan(settings, methods)
    for mp in result.methods:
        assert mp.status == "ok", (mp.label, mp.message)
        real_model, real = measure_real(settings, mp)
        # The tracker counts Parameters, and bnb keeps its quantization constants outside them (a GPU's
        # allocator sees them; the plan counts them as weights): add them to the measured figures.
        constants = real_quant_constant_bytes(real_model)
        assert mp.parameter_bytes == real.static["parameters"] + constants, mp.label
        real_peak = real.peak_bytes + constants
        assert abs(mp.peak_bytes / real_peak - 1) <= TOLERANCE, (mp.label, mp.peak_bytes, real_peak)
        assert abs(mp.activation_peak_bytes / real.activation_peak_bytes - 1) <= TOLERANCE, \
            (mp.label, mp.activation_peak_bytes, real.activation_peak_bytes)
        assert mp.optimizer_bytes == real.static["optimizer"], mp.label
        if "gc" in mp.techniques:
            assert mp.gradient_checkpointing == "applied", mp.label


def test_nf4_weight_bytes_are_under_0_3_of_fp32_and_gc_cuts_activations():
    result = plan(PlanSettings(model="llama-7b", batch_size=1, max_length=256, layers=1), "lora,lora+nf4,lora+nf4+gc")
    lora, qlora, qlora_gc = result.methods
    assert qlora.quantized_weight_bytes <= 0.3 * qlora.linear_weight_fp32_bytes
    # The arithmetic: 0.5 byte per weight + 1 byte per 64 + 4 bytes per 64·256, against 4 bytes.
    assert qlora.quantized_weight_bytes / qlora.linear_weight_fp32_bytes == pytest.approx(
        (0.5 + 1 / 64 + 4 / (64 * 256)) / 4, rel=1e-3)
    assert qlora.parameter_bytes < 0.35 * lora.parameter_bytes          # embeddings and LM head stay fp32
    assert qlora_gc.activation_peak_bytes < 0.5 * qlora.activation_peak_bytes
    assert qlora_gc.gradient_checkpointing == "applied" and qlora.gradient_checkpointing == "off"


def test_quantized_bytes_formula():
    w, c = quantized_weight_bytes(4096 * 4096, "nf4", 4096)
    assert w == 4096 * 4096 // 2 and c == 4096 * 64 + 4 * 1024 + 4 + 64 + 1024
    assert quantized_weight_bytes(100 * 30, "int8", 100) == (3000, 400)


def test_offload_is_modelled_for_cuda_and_refused_for_cpu():
    cuda = plan(PlanSettings(model="tiny-llama", batch_size=4, max_length=64), "lora,lora+offload")
    plain, off = cuda.methods
    assert off.status == "ok" and off.offload_host_bytes > 0 and plain.offload_host_bytes is None
    # The saved activations leave the GPU: the activation peak falls, by about what went to the host.
    assert off.activation_peak_bytes < 0.7 * plain.activation_peak_bytes
    assert off.offload_host_bytes >= plain.saved_activation_bytes * 0.9
    cpu = plan(PlanSettings(model="tiny-llama", batch_size=4, max_length=64, device="cpu"), "lora+offload")
    assert cpu.methods[0].status == "unsupported" and "meaningless" in cpu.methods[0].message


def test_plan_cli_rows_name_their_techniques(capsys, tmp_path):
    import json

    from memtune.cli import main

    code = main(["plan", "--model", "tiny-llama", "--methods", "lora+nf4+gc,lst+nf4,lst:keep_layers=1,2,lora",
                 "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    assert code == 0 and "lora+nf4+gc" in out and "lst+nf4" in out
    rows = json.loads((tmp_path / "p.json").read_text())["methods"]
    assert [r["label"] for r in rows] == ["lora+nf4+gc", "lst+nf4", "lst:keep_layers=1,2", "lora"]
    assert rows[0]["techniques"] == ["nf4", "gc"] and rows[2]["options"]["keep_layers"] == "1,2"
    with pytest.raises(ConfigError, match="unknown technique 'nf5'"):
        plan(PlanSettings(model="tiny-llama"), "lora+nf5")

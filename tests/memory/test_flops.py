"""Counted work of a planned step: FLOPs by phase (recompute, inverse passes, no-grad trunks), per-operator
interpolation in the batch, device-profile arithmetic and the cached CPU calibration."""
import json

import pytest
import torch
from torch import nn

from memtune.cli import main as cli_main
from memtune.memory import devices
from memtune.memory.devices import Curve, DeviceProfile, get_profile
from memtune.memory.flops import BACKWARD_SCORE_PASSES, StepCost, counting, interpolate
from memtune.memory.plan import PlanSettings, plan
from memtune.memory.plan_step import (build_planned_model, count_planned_step, make_batch, make_optimizer,
                                      planning_context, warm_up)
from memtune.memory.known_configs import resolve_config
from memtune.methods import ConfigError

# tiny-bert: 4 blocks, d = 64, feed-forward 128, 4 heads; batch 2 × 16 tokens.
B, T, D, FF, LAYERS = 2, 16, 64, 128, 4
N = B * T
# One block's forward products: q, k, v, o (4·d²) and the feed-forward (2·d·ff) per token, and the
# attention's QKᵀ and PV (2 · 2·B·H·T²·(d/H) = 4·B·T²·d).
BLOCKS_FORWARD = LAYERS * (2 * N * (4 * D * D + 2 * D * FF) + 4 * B * T * T * D)
SETTINGS = dict(model="tiny-bert", batch_size=B, max_length=T, device="cpu", device_profile="h100")


def phase_flops(m, phase):
    return m.cost.step_at(B).flops(phase)


def test_linear_stack_flops_are_the_textbook_counts():
    """Forward 2·B·in·out per layer; backward twice that, less the first layer's unneeded input gradient."""
    a, b, c = 24, 40, 8
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c))
        x = torch.empty(B, a)
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    with counting(opt) as counter:
        model(x).sum().backward()
        opt.step()
    cost = StepCost(tuple(counter.ops), B)
    assert cost.flops("forward") == 2 * B * (a * b + b * c)
    assert cost.flops("backward") == 2 * B * (2 * b * c + a * b)
    assert cost.flops("optimizer") == 0
    # AdamW reads and writes every parameter and both moments: at least 4 parameter-sized reads + 3 writes.
    param_bytes = 4 * (a * b + b + b * c + c)
    assert cost.totals()["optimizer"]["bytes"] >= 7 * param_bytes


def test_checkpointing_recompute_inverse_passes_and_no_grad_trunks_are_counted():
    r = plan(PlanSettings(**SETTINGS), "full,lora,lst,meft1")
    gc = plan(PlanSettings(**SETTINGS, gradient_checkpointing=True), "full")
    full, lora, lst, meft = r.methods
    # Forward: the blocks plus the classifier (2·B·d·2).
    assert phase_flops(full, "forward") == BLOCKS_FORWARD + 2 * B * D * 2
    assert phase_flops(full, "backward") == 2 * phase_flops(full, "forward")
    # Checkpointing recomputes every block's forward in backward, exactly.
    assert gc.methods[0].gradient_checkpointing == "applied"
    assert phase_flops(gc.methods[0], "backward") - phase_flops(full, "backward") == BLOCKS_FORWARD
    # A side method runs its trunk forward only: its backward is the small side network.
    assert phase_flops(lst, "forward") >= BLOCKS_FORWARD
    assert phase_flops(lst, "backward") < 0.1 * BLOCKS_FORWARD
    # MEFT reconstructs each block's input by running its inverse in backward: one more forward's work
    # than LoRA's backward (frozen weights, input gradients only), plus the adapters'.
    extra = phase_flops(meft, "backward") - phase_flops(lora, "backward")
    assert BLOCKS_FORWARD <= extra <= 1.25 * BLOCKS_FORWARD
    # On an H100 every operator of this tiny step is shorter than its launch: the step is launch-bound,
    # so its time is the operator count × the launch cost, whatever the FLOPs.
    launch = get_profile("h100").launch_s
    for m in r.methods:
        assert m.step_time_s == pytest.approx(len(m.cost.step_at(B).ops) * launch, rel=1e-9)
    assert full.time_vs_full == 1.0 and meft.time_vs_full > lora.time_vs_full


def _counted(method, batch):
    settings = PlanSettings(**SETTINGS)
    config, _ = resolve_config("tiny-bert")
    with planning_context():
        model, _ = build_planned_model(config, settings, method, {})
        opt = make_optimizer(model, settings)
        warm_up(model, opt, make_batch(model, settings, batch), settings)
        return count_planned_step(model, opt, make_batch(model, settings, batch), settings)


def test_steps_interpolate_per_operator_in_the_batch():
    two, four, three = _counted("lora", 2), _counted("lora", 4), _counted("lora", 3)
    guess = interpolate(two, four, 3)
    assert guess is not None and guess.ops == three.ops       # every FLOP and byte, operator by operator
    assert interpolate(two, StepCost(four.ops[:-1], 4), 3) is None


def test_profile_roofline_and_launch_overlap():
    gpu = DeviceProfile("g", "test", {"fp32": Curve([(1.0, 1e12)])}, Curve([(1.0, 1e11)]), transcendental=1e10,
                        random=1e9, launch_s=1e-5, launch_overlaps=True)
    cpu = DeviceProfile("c", "test", {"fp32": Curve([(1.0, 1e12)])}, Curve([(1.0, 1e11)]), transcendental=1e10,
                        random=1e9, launch_s=1e-5, launch_overlaps=False)
    assert gpu.op_seconds("matmul", "fp32", 1e9, 1e6, 0) == pytest.approx(1e-3)       # compute-bound
    assert gpu.op_seconds("matmul", "fp32", 1e6, 1e9, 0) == pytest.approx(1e-2)       # bandwidth-bound
    assert gpu.op_seconds("memory", "fp32", 0, 1e3, 0) == pytest.approx(1e-5)         # launch-bound
    assert cpu.op_seconds("memory", "fp32", 0, 1e6, 0) == pytest.approx(1e-5 + 1e-5)  # launch added
    assert gpu.op_seconds("random", "fp32", 0, 4e6, 1e6) == pytest.approx(1e-3)
    # Log-log interpolation between measured sizes, flat outside them.
    curve = Curve([(1e3, 1e9), (1e5, 1e11)])
    assert curve(1e4) == pytest.approx(1e10) and curve(1.0) == 1e9 and curve(1e9) == 1e11
    h100 = get_profile("h100")
    assert h100.matmul_rate("bf16", 1e12) > 10 * h100.matmul_rate("fp32", 1e12)


def test_fused_attention_is_priced_per_score_on_a_cpu_profile():
    # The same products (H·D = 32) over 1 head or 8: a CPU's fused kernel pays per score (scale, max, exp,
    # sum), 8× as many with 8 heads; a GPU profile prices the products only.
    tq = 64
    costs = {}
    for heads in (1, 8):
        with torch.device("meta"):
            q, k, v = (torch.empty(2, heads, tq, 32 // heads, requires_grad=True) for _ in range(3))
        with counting() as counter:
            counter.add_attention(q, k, v, causal=True)
        costs[heads] = StepCost(tuple(counter.ops), 2)
        scores = 2 * heads * tq * tq // 2
        assert [op[5] for op in counter.ops] == [scores, BACKWARD_SCORE_PASSES * scores]    # forward, backward
    assert costs[1].flops() == costs[8].flops()
    h100 = get_profile("h100")
    assert h100.attention_scores is None and costs[1].seconds(h100) == pytest.approx(costs[8].seconds(h100))
    cpu = DeviceProfile("c", "test", {"fp32": Curve([(1.0, 1e12)])}, Curve([(1.0, 1e11)]), transcendental=1e10,
                        random=1e9, launch_s=0.0, launch_overlaps=False, attention_scores={"fp32": 1e9})
    extra_passes = (8 - 1) * (2 * tq * tq // 2) * (1 + BACKWARD_SCORE_PASSES)
    assert costs[8].seconds(cpu) - costs[1].seconds(cpu) == pytest.approx(extra_passes / 1e9)
    assert cpu.attention_score_rate("bf16") == 1e9                  # bf16 falls back to the fp32 rate


def test_cpu_profile_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    fake = DeviceProfile("cpu", "test", {"fp32": Curve([(1.0, 5e10)])}, Curve([(1.0, 2e10)]), 1e9, 1e8, 5e-6, False)

    def calibrate():
        calls.append(1)
        return fake

    monkeypatch.setattr(devices, "calibrate_cpu", calibrate)
    first = get_profile("cpu")
    second = get_profile("cpu")
    assert len(calls) == 1 and devices.cache_path().is_file()
    assert second.to_dict() == first.to_dict() == fake.to_dict()
    get_profile("cpu", refresh=True)
    assert len(calls) == 2
    devices.cache_path().write_text("{not json")        # a damaged cache is measured again, not an error
    get_profile("cpu")
    assert len(calls) == 3 and json.loads(devices.cache_path().read_text())["name"] == "cpu"


def test_unknown_device_profile_is_a_clear_error(capsys):
    with pytest.raises(ConfigError, match="unknown device profile 'tpu'; known: cpu, h100"):
        get_profile("tpu")
    code = cli_main(["plan", "--model", "tiny-bert", "--methods", "lora", "--device-profile", "tpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("memtune: error: unknown device profile 'tpu'")

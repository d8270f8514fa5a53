"""Per-GPU bytes under DDP, ZeRO-1/2/3 and FSDP: the sharded categories add back to the unsharded plan,
frozen weights have no gradients or optimizer state, and communication follows the ring collectives."""
import json

import pytest

from memtune.cli import main as cli_main
from memtune.memory.devices import get_profile
from memtune.memory.plan import PlanSettings, plan
from memtune.memory.sharding import SCHEMES, shard_plan
from memtune.methods import ConfigError

N = 4
SETTINGS = dict(model="tiny-llama", batch_size=2, max_length=16, device_profile="h100")


@pytest.fixture(scope="module")
def rows():
    full, lora = plan(PlanSettings(**SETTINGS), "full,lora").methods
    return full, lora


SHARDED = {"ddp": set(), "zero1": {"optimizer"}, "zero2": {"optimizer", "gradient"},
           "zero3": {"optimizer", "gradient", "parameter"}, "fsdp": {"optimizer", "gradient", "parameter"}}


@pytest.mark.parametrize("scheme", sorted(SHARDED))
def test_sharded_bytes_add_back_to_the_unsharded_plan(rows, scheme):
    for m in rows:
        sp = shard_plan(m, N, scheme, get_profile("h100"), num_blocks=4, batch_size=2)
        static = {"parameter": m.parameter_bytes, "gradient": m.gradient_bytes, "optimizer": m.optimizer_bytes}
        for cat, total in static.items():
            if cat in SHARDED[scheme]:
                # N flat shards of ceil(total / N) bytes: the total plus less than N bytes of padding.
                assert 0 <= N * sp.static_per_gpu[cat] - total < N
            else:
                assert sp.static_per_gpu[cat] == total
        in_optimizer = m.peak_split["activation"] == 0          # full fine-tuning peaks in AdamW's step here
        divided = SHARDED[scheme] | ({"temporary"} if in_optimizer and "optimizer" in SHARDED[scheme] else set())
        for cat, total in m.peak_split.items():
            per = sp.per_gpu[cat]
            assert (0 <= N * per - total < N) if cat in divided else per == total
        # The per-GPU peak is the split plus what the scheme adds (gathered blocks or DDP's buckets), or the
        # backward's estimate where sharding made the optimizer step's peak the smaller one.
        split_peak = sum(sp.per_gpu.values()) + sp.gathered_bytes + sp.bucket_bytes + m.workspace_bytes
        assert sp.peak_bytes >= split_peak and (sp.peak_bytes == split_peak or sp.peak_phase.startswith("forward"))
        assert sp.peak_bytes <= m.peak_bytes + sp.gathered_bytes + sp.bucket_bytes


def test_frozen_weights_have_no_gradients_or_optimizer_state(rows):
    full, lora = rows
    assert lora.gradient_bytes < 0.2 * lora.parameter_bytes          # LoRA trains a small share
    for scheme in ("zero3", "fsdp"):
        sp = shard_plan(lora, N, scheme, num_blocks=4)
        # Every weight, frozen ones too, is sharded; gradients and state exist for trainable ones only.
        assert sp.static_per_gpu["parameter"] == -(-lora.parameter_bytes // N)
        assert sp.static_per_gpu["gradient"] == -(-lora.gradient_bytes // N)
        assert sp.static_per_gpu["optimizer"] == -(-lora.optimizer_bytes // N)
        # AdamW: two moments per trainable weight and a 4-byte step count per trainable tensor.
        steps = lora.optimizer_bytes - 2 * lora.gradient_bytes
        assert steps % 4 == 0 and 0 < steps < 0.01 * lora.optimizer_bytes
    ddp = shard_plan(lora, N, "ddp")
    assert ddp.bucket_bytes == lora.gradient_bytes                      # buckets hold trainable gradients only


def test_communication_volume_per_scheme(rows):
    full, _ = rows
    g, p = full.gradient_bytes, full.parameter_bytes
    ring = (N - 1) / N
    assert shard_plan(full, N, "ddp").comm_bytes == int(2 * ring * g)
    assert shard_plan(full, N, "zero2").comm_bytes == int(ring * g) + int(ring * g)
    assert shard_plan(full, N, "fsdp").comm_bytes == 2 * int(ring * p) + int(ring * g)
    one = shard_plan(full, 1, "fsdp", get_profile("h100"))
    assert one.comm_bytes == 0 and one.peak_bytes == full.peak_bytes and one.step_time_s == full.step_time_s
    sp = shard_plan(full, N, "fsdp", get_profile("h100"))
    assert sp.comm_seconds == pytest.approx(sp.comm_bytes / get_profile("h100").link_bytes_per_s)
    assert sp.step_time_s == max(full.step_time_s, sp.comm_seconds)
    with pytest.raises(ConfigError, match="multiple of the GPUs per node"):
        shard_plan(full, 12, "fsdp-hybrid", gpus_per_node=8)
    hybrid = shard_plan(full, 16, "fsdp-hybrid", gpus_per_node=8)
    assert hybrid.shard_group == 8 and hybrid.static_per_gpu["parameter"] == -(-p // 8)
    assert set(SCHEMES) == set(SHARDED) | {"fsdp-hybrid"}


def test_cli_shows_per_gpu_bytes_that_add_up(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = cli_main(["plan", "--model", "tiny-llama", "--methods", "full,lora", "--batch-size", "2",
                     "--max-length", "16", "--num-gpus", "4", "--sharding", "fsdp", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "Per GPU on 4 GPUs, fsdp" in text
    d = json.loads(out.read_text())
    for m in d["methods"]:
        per = d["distributed"]["per_method"][m["label"]]["static_per_gpu"]
        for cat in ("parameter", "gradient", "optimizer"):
            assert 0 <= 4 * per[cat] - m[f"{cat}_bytes"] < 4


def test_bad_gpu_count_or_scheme_is_a_clear_error(capsys):
    code = cli_main(["plan", "--model", "tiny-llama", "--methods", "lora", "--num-gpus", "0"])
    assert code == 2 and "memtune: error: --num-gpus must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown sharding 'zero4'; known: ddp, fsdp"):
        shard_plan(None, 2, "zero4")

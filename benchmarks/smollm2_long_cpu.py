"""QST against QLoRA + checkpointing on SmolLM2-135M at the issue's long shape, measured on this CPU.

    python benchmarks/smollm2_long_cpu.py                  # writes benchmarks/smollm2_long_cpu.json
    python benchmarks/smollm2_long_cpu.py --steps 2 --rows qlora_gc,qst_lean
    python benchmarks/smollm2_long_cpu.py --precision fp32 --batch-size 2    # smollm2_long_cpu_fp32.json

Workload (memtune issue #20): causal LM, batch 8 × 1024, bf16 autocast, AdamW, 4-bit NF4 frozen base
(bitsandbytes' CPU backend), PyTorch's fused attention (as SmolLM2 loads), the chunked loss in every row (none
keeps the 8 × 1024 × 49,152 vocabulary logits). The batch is real text: the Rotten Tomatoes training snippets
joined and cut into 8 rows of exactly 1,024 tokens, every token real and a target. Each row runs in its own
process (a fresh heap):

- peak: the live-bytes tracker over one step after two warm-up steps (`memtune train --measure-memory`'s);
- step time: CPU time of that process with one torch thread (`real_step.step_clock`; other jobs on the shared
  cores do not count), the fastest of `--steps` steps after the warm-up;
- the row's planned peak and time (`memtune plan --device cpu --precision bf16-amp --attn sdpa`, the calibrated
  CPU profile) beside them.

`--precision fp32` runs every row without autocast, for CPUs without bf16 instructions (no AVX512-BF16 or AMX:
PyTorch's bf16 matrix products there run at a few GFLOP/s, a fraction of fp32's, so a bf16 step times the
fallback kernel rather than the method). `cpu_bf16` in the record says which kind of CPU measured it. At a
smaller batch the time ratios keep the long shape's balance (attention and matrix work per token depend on T,
not B); the peak ratios do not, since the weights weigh the same at any batch.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OUT = {"bf16": HERE / "smollm2_long_cpu.json", "fp32": HERE / "smollm2_long_cpu_fp32.json"}
PRECISION = {"precision": "bf16"}         # train's --precision (bf16: fp32 weights under autocast)
SHAPE = {"batch": 8, "length": 1024}     # the issue's; --batch-size / --max-length for a quick check
ROWS = {  # label → method spec
    "qlora_gc": "lora+nf4+gc+chunked_ce",
    "qst": "qst+nf4+chunked_ce",
    "qst_lean": "qst:side_checkpointing=true:downsample=avgpool+nf4+chunked_ce",
    # One side head (SmolLM2 keeps H = 9 heads of width 4 at r = 16): the side attention's scores and
    # softmax are B·H'·T² per block however narrow the heads, and at T = 1024 on a CPU they cost about what
    # the backbone's attention does.
    "qst_h1": "qst:side_heads=1+nf4+chunked_ce",
    "qst_lean_h1": "qst:side_checkpointing=true:downsample=avgpool:side_heads=1+nf4+chunked_ce",
}
PEER = "qlora_gc"


def text_batch(tokenizer) -> dict[str, torch.Tensor]:
    """B rows of exactly T real tokens of Rotten Tomatoes text (no padding); labels = inputs."""
    from memtune.data import load_task

    B, T = SHAPE["batch"], SHAPE["length"]
    ids: list[int] = []
    for example in load_task("rotten-tomatoes").train:
        ids += tokenizer(example["text"] + "\n")["input_ids"]
        if len(ids) >= B * T:
            break
    input_ids = torch.tensor(ids[:B * T]).view(B, T)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def train_args(spec: str):
    """The spec as `memtune train` settings (its options and technique flags) at the workload's shape."""
    from memtune.spec import parse_specs
    from memtune.techniques import MemoryTechniques
    from memtune.train import TrainArgs

    parsed = parse_specs([spec])[0]
    t = MemoryTechniques.from_names(parsed.techniques)
    return TrainArgs(model="smollm2-135m", task="rotten-tomatoes", objective="causal-lm", method=parsed.method,
                     options=dict(parsed.options), precision=PRECISION["precision"], batch_size=SHAPE["batch"],
                     max_length=SHAPE["length"],
                     gradient_checkpointing=t.gradient_checkpointing, quantize=t.quantize,
                     offload_activations=t.offload_activations, chunked_ce=t.chunked_ce)


def measure_row(spec: str, steps: int) -> dict:
    """One row in this process: the fastest step's CPU time and the tracked peak of one step."""
    from memtune.memory.measure import measure_training_memory, training_step
    from memtune.memory.real_step import step_times
    from memtune.models import load_model
    from memtune.train import memory_step

    torch.set_num_threads(1)
    args = train_args(spec)
    batch = text_batch(load_model(args.model).preprocessor)
    model, batch, optimizer, autocast = memory_step(args, batch)
    times = step_times(lambda: training_step(model, batch, optimizer, autocast), warmup=2, steps=steps)
    memory = measure_training_memory(model, batch, optimizer, warmup=0, steps=1, autocast=autocast)
    return {"step_time_s": min(times), "step_times_s": times, "peak_bytes": memory.peak_bytes,
            "memory": memory.to_dict(), "trainable_params": sum(p.numel() for p in model.parameters()
                                                                 if p.requires_grad)}


def planned(spec: str) -> dict:
    from memtune.memory.plan import plan
    from memtune.memory.plan_types import PlanSettings

    settings = PlanSettings(model="smollm2-135m", batch_size=SHAPE["batch"], max_length=SHAPE["length"],
                            precision={"bf16": "bf16-amp", "fp32": "fp32"}[PRECISION["precision"]],
                            device="cpu", layers=2,           # bf16: fp32 weights + autocast, as train
                            attn="sdpa")                       # as `load_model` gives SmolLM2 (a fused kernel)
    m = plan(settings, [spec]).methods[0]
    return {"status": m.status, "message": m.message, "peak_bytes": m.peak_bytes, "step_time_s": m.step_time_s}


def cpu_has_bf16() -> bool | None:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16); None where it cannot tell."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def replan(path: Path) -> int:
    """Recompute every row's plan in the record at `path`, at the record's own shape and precision."""
    report = json.loads(path.read_text())
    w = report["workload"]
    SHAPE.update(batch=w["batch_size"], length=w["max_length"])
    PRECISION["precision"] = w["precision"]
    for label, row in report["rows"].items():
        row["plan"] = planned(row["spec"])
        print(label, {k: row["plan"][k] for k in ("peak_bytes", "step_time_s")})
    path.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", choices=tuple(OUT), default="bf16")
    ap.add_argument("--out", help="default: benchmarks/smollm2_long_cpu.json (bf16), smollm2_long_cpu_fp32.json")
    ap.add_argument("--batch-size", type=int, default=SHAPE["batch"])
    ap.add_argument("--max-length", type=int, default=SHAPE["length"])
    ap.add_argument("--replan", action="store_true",
                    help="measure nothing: redo the planned columns of the record at --out (after a planner change)")
    ap.add_argument("--measure-row", metavar="SPEC", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    SHAPE.update(batch=ns.batch_size, length=ns.max_length)
    PRECISION["precision"] = ns.precision
    if ns.replan:
        return replan(Path(ns.out or OUT[ns.precision]))
    if ns.measure_row:
        print(json.dumps(measure_row(ns.measure_row, ns.steps)))
        return 0
    unknown = [r for r in ns.rows.split(",") if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {', '.join(unknown)}; rows are {', '.join(ROWS)}")
    rows = {}
    for label in ns.rows.split(","):
        spec = ROWS[label]
        print(f"{label}: {spec}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--steps", str(ns.steps), "--batch-size", str(ns.batch_size),
                               "--max-length", str(ns.max_length), "--precision", ns.precision,
                               "--measure-row", spec],
                              capture_output=True, text=True)
        row = {"spec": spec, "plan": planned(spec)}
        if proc.returncode != 0:
            row["error"] = proc.stderr.strip().splitlines()[-1:]
        else:
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows[label] = row
    peer = rows.get(PEER, {})
    for row in rows.values():
        if "peak_bytes" in row and "peak_bytes" in peer:
            row["peak_vs_peer"] = row["peak_bytes"] / peer["peak_bytes"]
            row["time_vs_peer"] = row["step_time_s"] / peer["step_time_s"]
    import transformers

    report = {"workload": {"model": "smollm2-135m", "batch_size": ns.batch_size, "max_length": ns.max_length,
                           "precision": ns.precision, "attn": "sdpa", "quantize": "nf4", "optimizer": "adamw",
                           "torch_threads": 1, "device": "cpu", "cpu_bf16": cpu_has_bf16()},
              "timing": f"CPU time of one thread, fastest of {ns.steps} steps after 2 warm-up steps; one process "
                        "per row", "peer": PEER, "rows": rows,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}
    Path(ns.out or OUT[ns.precision]).write_text(json.dumps(report, indent=1) + "\n")
    for label, row in rows.items():
        print(label, {k: row.get(k) for k in ("step_time_s", "peak_bytes", "peak_vs_peer", "time_vs_peer", "error")})
    return 0


if __name__ == "__main__":
    sys.exit(main())

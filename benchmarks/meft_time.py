"""Where MEFT's step time goes, next to full fine-tuning and LoRA + checkpointing on the same workload.

    python benchmarks/meft_time.py                 # writes benchmarks/meft_time.json
    python benchmarks/meft_time.py --rows full,meft2 --steps 3

Workload: the planner's real step (`memory/real_step.py`) for MiniLM at batch 32 × 128, fp32, AdamW, eager
attention, one torch thread, CPU time of the process (a shared machine's other work does not count). Each row runs
in its own process. A step is split into forward (with the loss), backward and optimizer; for MEFT the backward is
split further by timing the reversible layers' own work:

- `recompute_forward_s`: F and G run again, with a graph of one sub-network at a time, to rebuild each layer's
  input from its output (the inverse) — the part a method that stores its activations does not do;
- `vjp_backward_s`: the vector-Jacobian products through those graphs (`torch.autograd.grad`);
- the rest of the backward: the upper, non-reversible layers (if any), the head and the embedding side.

The first step's segment calibration (`calibration_s`) is timed once, apart from the steps. The cost model that
says what is inherent: a reversible layer's backward is one forward of F and G (the inverse) plus their VJPs, and
a VJP costs about twice a forward, so a MEFT step is about (1 + 1 + 2) / (1 + 2) = 1.33 × full fine-tuning's
layer work, less the weight gradients of frozen weights that full fine-tuning computes and MEFT does not.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROWS = {"full": ("full", False), "lora+gc": ("lora", True), "meft1": ("meft1", False), "meft2": ("meft2", False),
        "meft3": ("meft3", False)}
SETTINGS = dict(model="minilm", batch_size=32, max_length=128, device="cpu", attn="eager")


class Timer:
    """Accumulates CPU time spent inside wrapped functions (non-reentrant: an inner call is not counted twice)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self._depth = 0

    def wrap(self, owner, name: str, key: str):
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t0 = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[key] = self.totals.get(key, 0.0) + time.process_time() - t0
                self._depth -= 1

        setattr(owner, name, timed)


def measure(label: str, steps: int) -> dict:
    from memtune.memory.plan import PlanSettings
    from memtune.memory.real_step import build_real_step

    torch.set_num_threads(1)
    method, gc = ROWS[label]
    step = build_real_step(PlanSettings(**SETTINGS, gradient_checkpointing=gc), method, {})
    model, batch, opt = step.model, step.batch, step.optimizer
    timer = Timer()
    if method.startswith("meft"):
        from memtune.methods.meft import coupling, model as meft_model

        timer.wrap(meft_model.MEFTModel, "_calibrate", "calibration_s")

        # Inside backward_layer: the graph-free inverse (F, G under no_grad) and the two VJPs.
        def grad_timed(grad=torch.autograd.grad):
            def g(*a, **k):
                t0 = time.process_time()
                try:
                    return grad(*a, **k)
                finally:
                    timer.totals["vjp_grad_call_s"] = timer.totals.get("vjp_grad_call_s", 0.0) + time.process_time() - t0
            return g

        coupling.torch.autograd.grad = grad_timed()
        timer.wrap(coupling.TwoStream, "backward_layer", "backward_layers_s")
    clock = time.process_time
    phases = {"forward_s": [], "backward_s": [], "optimizer_s": [], "step_s": []}
    parts: list[dict] = []
    for i in range(2 + steps):
        before = dict(timer.totals)
        t0 = clock()
        loss = model(**batch).loss
        t1 = clock()
        loss.backward()
        t2 = clock()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = clock()
        if i < 2:                                    # warm-up (the first step calibrates MEFT's segments)
            continue
        for k, v in (("forward_s", t1 - t0), ("backward_s", t2 - t1), ("optimizer_s", t3 - t2), ("step_s", t3 - t0)):
            phases[k].append(v)
        parts.append({k: timer.totals.get(k, 0.0) - before.get(k, 0.0) for k in timer.totals})
    best = min(range(steps), key=lambda j: phases["step_s"][j])
    out = {"label": label, **{k: v[best] for k, v in phases.items()}, "step_times_s": phases["step_s"]}
    if method.startswith("meft"):
        p = parts[best]
        # backward_layer = inverse (no graph) + VJPs; the grad calls are the VJPs' backward halves.
        out["reversible_backward_s"] = p.get("backward_layers_s", 0.0)
        out["vjp_backward_s"] = p.get("vjp_grad_call_s", 0.0)
        out["recompute_forward_s"] = out["reversible_backward_s"] - out["vjp_backward_s"]
        out["calibration_s"] = timer.totals.get("calibration_s", 0.0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--row", help=argparse.SUPPRESS)            # internal: measure one row in this process
    ap.add_argument("--out", default=str(HERE / "meft_time.json"))
    a = ap.parse_args()
    if a.row:
        print(json.dumps(measure(a.row, a.steps)))
        return
    records = []
    for label in a.rows.split(","):
        res = subprocess.run([sys.executable, __file__, "--row", label, "--steps", str(a.steps)],
                             capture_output=True, text=True, check=True)
        rec = json.loads(res.stdout.strip().splitlines()[-1])
        records.append(rec)
        print(f"{label:8s} step {rec['step_s']:.3f} s  forward {rec['forward_s']:.3f}  backward {rec['backward_s']:.3f}"
              + (f"  (recompute {rec['recompute_forward_s']:.3f}, vjp {rec['vjp_backward_s']:.3f})"
                 if "vjp_backward_s" in rec else ""), flush=True)
    full = next((r for r in records if r["label"] == "full"), None)
    if full:
        for r in records:
            r["step_vs_full"] = round(r["step_s"] / full["step_s"], 3)
    from memtune.run_info import git_commit, machine, versions

    Path(a.out).write_text(json.dumps({"settings": SETTINGS, "steps": a.steps, "threads": 1,
                                       "clock": "process CPU time", "git_commit": git_commit(), "machine": machine(),
                                       "versions": versions(), "records": records}, indent=2) + "\n")


if __name__ == "__main__":
    main()

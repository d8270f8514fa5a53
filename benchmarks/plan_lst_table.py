"""The LST paper's memory table (docs/methods/anchors.md §1), reproduced by `memtune plan`.

    python benchmarks/plan_lst_table.py        # writes benchmarks/plan_lst_table.{json,md}

Workload (the paper's released scripts): T5-base, batch 100, source length 128, fp32, AdamW, eager
attention, one training step. The paper's unit is "GB" = max_memory_allocated / 2^20 / 1000 (MiB/1000),
so the plan's bytes are shown in that unit here (and only here; memtune reports GiB elsewhere).

Method settings, chosen to match the paper's trainable shares:
    Adapter  bottleneck adapters, reduction 16, memtune's default (2.01 % of T5-base; paper 1.63 %; reduction
             20 gives 1.59 % and 1 % less memory)
    LoRA     r = 32 on q and v (1.59 %; paper 1.71 %)
    BitFit   T5 has no bias terms, so memtune refuses BitFit on it; the row plans BitFit on a T5 with a
             zero bias added to every linear layer (0.09 %; paper 0.13 %, which also counts biases
             outside the linear layers, e.g. of layer norms and the LM head: those change no activations)
    LST      r = 8, layers {1,2,3,5,6,7,9,10,11} kept (the paper's T5-base run; 1.74 % of T5-base)
The paper trained text-to-text: the decoder runs over the label tokens (about 2-6 for GLUE labels + EOS)
and the loss spans the vocabulary. The table shows the plan of memtune's T5 classifier (one decoder
position, a class head) and of its text-to-text objective at 4 target tokens (`--objective seq2seq
--target-length 4`: the tied LM head and the token cross-entropy over 32,128 words), the paper's run.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from memtune.memory.plan import PlanSettings, plan

PAPER_UNIT = 2 ** 20 * 1000                 # the paper's "GB": MiB/1000
PAPER = {                                   # method → (% params, train memory "GB"), docs/methods/anchors.md §1
    "full": (100.0, 17.6), "adapter": (1.63, 13.0), "lora": (1.71, 12.6), "bitfit": (0.13, 10.7), "lst": (1.74, 5.5),
}
ROWS = [  # (row name, method spec, add biases)
    ("full", "full", False),
    ("adapter", "adapter", False),
    ("lora", "lora:r=32", False),
    ("bitfit", "bitfit", True),
    ("lst", "lst:r=8:keep_layers=1,2,3,5,6,7,9,10,11", False),
    ("linear (floor)", "linear", False),
]
# The same step of memtune's implementations measured on a GPU by benchmarks/plan_vs_cuda.py (row method labels).
MEASURED_FILE = Path(__file__).resolve().parent / "plan_vs_cuda.json"
MEASURED_LABELS = {"full": "full", "adapter": "adapter", "lora": "lora:r=32",
                   "bitfit": "bitfit+bias", "lst": "lst:keep_layers=1,2,3,5,6,7,9,10,11", "linear (floor)": "linear"}


def measured() -> dict:
    """Row name → (peak bytes on the GPU, corrected for a harness artifact where noted, device name)."""
    if not MEASURED_FILE.exists():
        return {}
    out = {}
    for r in json.loads(MEASURED_FILE.read_text())["rows"]:
        if r["model"] != "t5-base" or r["settings"] != {"batch_size": 100, "max_length": 128}:
            continue
        for name, label in MEASURED_LABELS.items():
            if r["method"] == label:
                peak = r["cuda_peak_bytes"]
                if "note" in r and "still allocated" in r["note"]:
                    peak -= r["cuda_start_bytes"] - r["plan_start_bytes"]   # the previous model's weights
                out[name] = (peak, r.get("device", "GPU"))
    return out


def add_biases(hf) -> None:
    """A zero bias on every linear layer of T5 (HF's T5 has none), so BitFit has something to train."""
    for m in hf.modules():
        if isinstance(m, nn.Linear) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_features))


def run(objective: str, target_length: int) -> dict:
    out = {}
    for name, spec, biases in ROWS:
        if objective == "seq2seq" and spec == "linear":
            continue                        # a linear probe has no head to train under the frozen LM head
        settings = PlanSettings(model="t5-base", batch_size=100, max_length=128, precision="fp32",
                                optimizer="adamw", attn="eager", objective=objective, target_length=target_length)
        mp = plan(settings, [spec], prepare=add_biases if biases else None).methods[0]
        out[name] = mp
    return out


COMMON_GAP = (
    "Every row is below the paper, by 1.5-3.5 \"GB\" (17-28 %), while the ratios to full fine-tuning agree "
    "within 0.09. The planner is not the cause: the same step of memtune's implementations measured on an "
    "H100 (column H100) is within 1 % of the plan. The paper measured a different run: (1) seq2seq "
    "training: the decoder runs over the label tokens (2-6 for GLUE labels + EOS) and the loss spans the "
    "32,128-word vocabulary, where memtune's T5 classifier reads one decoder position; planned with that "
    "objective at 4 target tokens (the seq2seq column), full fine-tuning grows by {dec4:.2f} \"GB\"; (2) the HF Trainer of 2022 zeroed gradients instead of freeing them, so full "
    "fine-tuning kept {grads:.2f} \"GB\" of gradients through the forward pass; (3) the peak is over the whole "
    "run, evaluation with generation included; (4) PyTorch 1.x, transformers 4.x T5 code, an A6000. "
    "(1) and (2) account for about {known:.1f} \"GB\" of full fine-tuning's {full_gap:.1f}; the rest, and "
    "most of the PEFT rows' 3 \"GB\", cannot be attributed without re-running the released scripts on "
    "their stack. For scale: planning with CPU kernels (dropout saving a float mask instead of CUDA's "
    "1-byte mask) adds 3 bytes per dropout element and lands within -16 % to +7 % of every paper row, but "
    "CUDA's fused dropout kept 1-byte masks in PyTorch 1.x too, so that is not offered as the cause."
)
EXPLAIN = {
    "lst": ("LST is the furthest below (−{pct:.0f} %): its own step is small, so fixed costs of the paper's "
            "run weigh more: the side decoder over the label tokens, the vocabulary loss, and evaluation "
            "with generation (frozen backbone, side network and side KV cache at the evaluation batch). "
            "Its Fisher initialisation (1024 single-example backward passes through the full model, about "
            "1.7 \"GB\") is below the training peak and not the cause."),
    "bitfit": ("The paper's BitFit row is unverified (docs/methods/anchors.md §1), and HF's T5 has no bias terms: the "
               "paper's code must have added some, and which ones decides the memory. With a bias on every "
               "linear layer the backward still crosses every block (input gradients need the attention "
               "maps and FFN activations), so BitFit sits just below LoRA here (0.95×); the paper's 10.7 "
               "is 0.85× its LoRA, which suggests fewer biases on the backprop path or another T5 code."),
}


def main() -> int:
    t0 = time.perf_counter()
    one, four = run("classification", 1), run("seq2seq", 4)
    full1, full4 = one["full"].peak_bytes, four["full"].peak_bytes
    records, lines = [], []
    gpu = measured()
    lines.append("| method | % params (paper) | % params (plan) | paper \"GB\" | plan \"GB\" | H100 \"GB\" | "
                 "plan \"GB\", seq2seq, 4 target tokens | paper ÷ full | plan ÷ full | plan ÷ paper |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for name, spec, biases in ROWS:
        a, b = one[name], four.get(name)
        key = name.split()[0]
        paper_pct, paper_gb = PAPER.get(key, (None, None))
        plan_gb, plan4_gb = a.peak_bytes / PAPER_UNIT, None if b is None else b.peak_bytes / PAPER_UNIT
        gpu_gb = gpu[name][0] / PAPER_UNIT if name in gpu else None
        rec = {"method": name, "spec": spec, "biases_added": biases, "paper_pct": paper_pct, "paper_gb": paper_gb,
               "plan_pct": a.trainable_pct, "plan_trainable_params": a.trainable_params,
               "plan_peak_bytes": a.peak_bytes, "plan_activation_peak_bytes": a.activation_peak_bytes,
               "plan_peak_split_bytes": a.peak_split, "plan_gb": plan_gb, "plan_gb_seq2seq_4_targets": plan4_gb,
               "measured_gb": gpu_gb, "measured_device": gpu[name][1] if name in gpu else None,
               "plan_ratio_to_full": a.peak_bytes / full1,
               "plan_ratio_to_full_seq2seq_4": None if b is None else b.peak_bytes / full4,
               "paper_ratio_to_full": paper_gb / PAPER["full"][1] if paper_gb else None,
               "plan_over_paper": plan_gb / paper_gb if paper_gb else None}
        records.append(rec)
        fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
        label = name + (" (+ biases)" if biases else "")
        lines.append(f"| {label} | {fmt(paper_pct, '.2f')} | {a.trainable_pct:.2f} | {fmt(paper_gb, '.1f')} | "
                     f"{plan_gb:.2f} | {fmt(gpu_gb, '.2f')} | {fmt(plan4_gb, '.2f')} | "
                     f"{fmt(rec['paper_ratio_to_full'], '.2f')} | {rec['plan_ratio_to_full']:.2f} | "
                     f"{fmt(rec['plan_over_paper'], '.2f')} |")
        if paper_gb and abs(plan_gb / paper_gb - 1) > 0.10:
            rec["gap"] = "common" + (" + own" if key in EXPLAIN else "")
            if key in EXPLAIN:
                rec["gap_explanation"] = EXPLAIN[key].format(pct=100 * (1 - plan_gb / paper_gb))
                notes.append(f"- **{label}: plan {plan_gb:.2f} vs paper {paper_gb:.1f} "
                             f"({100 * (plan_gb / paper_gb - 1):+.0f} %).** {rec['gap_explanation']}")
    f1 = one["full"]
    dec4 = (four["full"].peak_bytes - f1.peak_bytes) / PAPER_UNIT
    grads = f1.gradient_bytes / PAPER_UNIT
    common_text = COMMON_GAP.format(dec4=dec4, grads=grads, known=dec4 + grads,
                                    full_gap=PAPER["full"][1] - f1.peak_bytes / PAPER_UNIT)
    header = [
        "## LST memory table (T5-base, batch 100, length 128, fp32, AdamW, eager), planned by `memtune plan`",
        "",
        "\"GB\" = MiB/1000, the paper's unit (docs/methods/anchors.md §0). Plan = one training step's live-bytes peak on the "
        "meta device, modelling a GPU (fused dropout, foreach AdamW, cuBLAS workspace), which is what "
        "`torch.cuda.max_memory_allocated()` reports for the step. H100 = that step of memtune's implementation "
        "measured on an H100 (benchmarks/plan_vs_cuda.json). Paper = whole-run peak of the released scripts "
        "(evaluation with generation included).",
        "",
    ]
    common = ["", "**Gaps over 10 %.** " + common_text]
    md = "\n".join(header + lines + common + ([""] + notes if notes else [])) + "\n"
    out = Path(__file__).resolve().parent
    (out / "plan_lst_table.md").write_text(md)
    (out / "plan_lst_table.json").write_text(json.dumps({
        "setting": {"model": "t5-base", "batch_size": 100, "max_length": 128, "precision": "fp32",
                    "optimizer": "adamw", "attn": "eager", "unit": "MiB/1000 (paper 'GB')"},
        "common_gap_explanation": common_text,
        "rows": records, "torch": torch.__version__, "seconds": time.perf_counter() - t0,
    }, indent=2) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

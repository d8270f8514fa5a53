"""Render benchmarks/RESULTS.md from the committed JSON files (nothing here is typed by hand).

    python benchmarks/make_results.py
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
GIB = 2**30
CUDA_SUITES = {
    "minilm-b32-l128-fp32": "MiniLM-L6 shape (BERT, 6 × 384), batch 32 × 128 tokens, fp32",
    "t5base-b100-l128-fp32": "T5-base, batch 100 × 128 tokens, fp32 — the LST paper's setting",
    "vitb16-b32-224-fp16amp": "ViT-B/16, batch 32 × 224², AMP fp16 — the DTL paper's setting",
    "bertbase-b16-l512-fp32": "BERT-base, batch 16 × 512 tokens (padded), fp32 — MEFT's padding protocol",
    "smollm2-b8-l256-bf16amp": "SmolLM2-135M shape (Llama, 30 × 576), causal LM, batch 8 × 256, AMP bf16",
    "smollm2-b8-l1024-bf16amp": "SmolLM2-135M shape (Llama, 30 × 576), causal LM, batch 8 × 1024, AMP bf16",
}


def ratio(x, base):
    return f"{x / base:.2f}" if base else "–"


def cuda_section() -> str:
    path = HERE / "cuda_memory.json"
    if not path.exists():
        return ""
    recs = json.loads(path.read_text())
    first = next(r for r in recs if "error" not in r)
    out = ["## CUDA: peak memory and time per step on an H100",
           f"One fresh process per row; random weights built from each architecture's config (memory does not depend "
           f"on weight values); inputs padded to exactly L; AdamW; eager attention; 3 warm-up steps, peak stats reset, "
           f"5 measured steps (`max_memory_allocated`), then the median of 10 timed steps. "
           f"GPU: {first['gpu']}, torch {first['torch']}. Command: `python benchmarks/cuda_memory.py` "
           f"(raw records: `cuda_memory.json`).", "",
           "*gap closed* = (full − method) / (full − linear probe) of the peak: 1.0 means as cheap as a frozen backbone.",
           ""]
    for suite, title in CUDA_SUITES.items():
        rows = [r for r in recs if r.get("suite") == suite]
        if not rows:
            continue
        full = next((r for r in rows if r["method"] == "full" and "error" not in r), None)
        floor = next((r for r in rows if r["method"] == "linear" and "error" not in r), None)
        out += [f"### {title}", "",
                "| method | trainable | peak GiB | ×full | activation peak GiB | ×full | reserved GiB | gap closed | "
                "ms/step | ×full |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                out.append(f"| {r['method']} | failed: {r['error'][:100]} |||||||||")
                continue
            gap = "–"
            if full and floor and full["peak_bytes"] != floor["peak_bytes"]:
                gap = f"{(full['peak_bytes'] - r['peak_bytes']) / (full['peak_bytes'] - floor['peak_bytes']):.2f}"
            pct = 100 * r["trainable_params"] / r["total_params"]
            out.append(
                f"| {r['method']} | {r['trainable_params']:,} ({pct:.2f} %) | {r['peak_bytes'] / GIB:.3f} | "
                f"{ratio(r['peak_bytes'], full and full['peak_bytes'])} | {r['activation_peak_bytes'] / GIB:.3f} | "
                f"{ratio(r['activation_peak_bytes'], full and full['activation_peak_bytes'])} | "
                f"{r['reserved_bytes'] / GIB:.3f} | {gap} | {1000 * r['step_time_s']:.1f} | "
                f"{ratio(r['step_time_s'], full and full['step_time_s'])} |")
        out.append("")
    return "\n".join(out)


def cpu_section(name: str, title: str) -> str:
    path = HERE / name / "results.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    table = (HERE / name / "results.md").read_text().strip()
    v = data["versions"]
    m = data["machine"]
    return "\n".join([
        f"## {title}", "",
        f"Command: `{data['command']}` (via `python benchmarks/run_cpu.py`); git {data['git_commit']}; "
        f"{m['platform']}, {m['cpu_count']} CPU cores; torch {v['torch']}, transformers {v['transformers']}, "
        f"peft {v['peft']}, accelerate {v['accelerate']}.", "",
        "Memory is the exact CPU live-tensor tracker (bytes of live storages, repeatable to the byte). Accuracy is "
        "one seed on the test split. s/step: " + (
            data["step_time_source"] + "; where a row has none, its training wall time was taken while other jobs "
            "shared the 2 cores and is not shown (it is kept as `train_step_time_s` in the JSON)."
            if "step_time_source" in data else "wall time of the training steps (noisy on a shared 2-core machine)."),
        "",
        table, "", f"![memory vs accuracy]({name}/memory_vs_accuracy.png)",
        *([f"![memory vs time]({name}/memory_vs_time.png)"] if (HERE / name / "memory_vs_time.png").exists() else []),
        ""])


def step_time_section() -> str:
    """Measured step times (CPU time, one thread) next to the planner's predictions."""
    out = []
    for name in ("step_time_minilm_b32.json", "plan_time_vs_cpu.json"):
        path = HERE / name
        if not path.exists():
            continue
        d = json.loads(path.read_text())
        w = d["workload"]
        rows = {r["row"]: r for r in d["rows"]}
        base = rows.get("lora+gc", {}).get("measured_step_time_s")
        out += [f"### Step time, {w['model']}, batch {w['batch_size']} × {w['max_length']}, {w['precision']}, "
                f"{w['attn']} attention, {w['torch_threads']} thread", "",
                f"`python benchmarks/plan_time_vs_cpu.py --batch-size {w['batch_size']} --max-length {w['max_length']}` "
                f"(raw: `{name}`); {d['timing']}; CPU time of the process, so other jobs on the machine do not count. "
                "Predicted: `memtune plan` on the calibrated CPU profile.", "",
                "| row | measured s/step | × full | × LoRA+gc | predicted s/step | predicted × full | ratio error | "
                "planned peak vs tracker |", "|---|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            if "measured_step_time_s" not in r:
                out.append(f"| {label} | failed: {r.get('plan_message') or 'not measured'} |||||||")
                continue
            vs = f"{r['measured_step_time_s'] / base:.2f}" if base else "–"
            out.append(f"| {label} | {r['measured_step_time_s']:.3f} | {r['measured_ratio']:.2f} | {vs} | "
                       f"{r['predicted_step_time_s']:.3f} | {r['predicted_ratio']:.2f} | {100 * r['ratio_error']:+.1f} % | "
                       f"{100 * r['peak_error']:+.2f} % |")
        out.append("")
    return "\n".join(["## CPU: step time per method, measured and predicted", ""] + out) if out else ""


# QLoRA + checkpointing with the loss computed as the row computes it (plain, or chunked).
QLORA_GC = {False: "lora+nf4+gc", True: "lora+nf4+gc+chunked_ce"}


def qlora_gc_for(label: str) -> str:
    return QLORA_GC[label.endswith("+chunked_ce")]


def plan_large_section() -> str:
    path = HERE / "plan_large.json"
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    budgets = d["budgets_gib"]
    out = ["## Planned: decoders with what users run when memory is short", "",
           "`python benchmarks/plan_large.py` (raw: `plan_large.json`): one causal-LM training step planned on the meta "
           "device (AdamW; 2 and 4 blocks planned and extrapolated to full depth). On `cpu` the plan equals the CPU "
           "tracker to the byte (tests/memory); the other rows model an H100 (fused kernels, predicted time). "
           "Rows ending in `+chunked_ce` take the vocabulary-wide loss a chunk of tokens at a time (its gradient "
           "in the forward, no N × V logits kept); their × QLoRA+gc column is against `lora+nf4+gc+chunked_ce`, "
           "the other rows' against `lora+nf4+gc`, so each ratio compares the same loss computation.", ""]
    for w in d["workloads"]:
        recs = w["records"]
        refs = {r["label"]: r for r in recs if r["label"] in QLORA_GC.values() and r["status"] == "ok"}
        out += [f"### {w['title']}", "",
                "| row | trainable | peak GiB | activation peak GiB | × QLoRA+gc peak | predicted s/step | "
                + " | ".join(f"fits {b} GiB" for b in budgets) + " |", "|---" * (6 + len(budgets)) + "|"]
        for r in recs:
            if r["status"] != "ok":
                out.append(f"| {r['label']} | {r['status']}: {r['message'][:90]} |" + " |" * (5 + len(budgets)))
                continue
            ref = refs.get(qlora_gc_for(r["label"]))
            vs = f"{r['peak_bytes'] / ref['peak_bytes']:.2f}" if ref else "–"
            t = f"{r['step_time_s']:.3f}" if r.get("step_time_s") else "–"
            out.append(f"| {r['label']} | {r['trainable_params']:,} | {r['peak_bytes'] / GIB:.2f} | "
                       f"{r['activation_peak_bytes'] / GIB:.2f} | {vs} | {t} | "
                       + " | ".join("yes" if r["fits_gib"][str(b)] else "no" for b in budgets) + " |")
        out.append("")
    return "\n".join(out)


def _by_label(path: Path) -> dict:
    if not path.exists():
        return {}
    return {r["label"]: r for r in json.loads(path.read_text())["records"] if "error" not in r}


def _cuda(suite: str) -> dict:
    path = HERE / "cuda_memory.json"
    recs = json.loads(path.read_text()) if path.exists() else []
    return {r["method"]: r for r in recs if r.get("suite") == suite and "error" not in r}


def targets_section() -> str:
    """The issues' numeric targets, checked against the measurements above."""
    cpu = _by_label(HERE / "minilm-rotten-tomatoes" / "results.json")
    gpu = _cuda("minilm-b32-l128-fp32")
    t5 = _cuda("t5base-b100-l128-fp32")
    rows = ["## Targets from the issues, checked", "",
            "| claim | measured | target | met |", "|---|---|---|---|"]

    def add(claim, value, target, ok):
        rows.append(f"| {claim} | {value} | {target} | {'yes' if ok else '**no**'} |")

    lst_rows = [label for label, r in cpu.items() if r.get("method") == "lst"]
    if lst_rows and "lst" not in cpu:       # the older targets below name LST's row "lst": its last (default) form
        cpu = {**cpu, "lst": cpu[lst_rows[-1]]}
    if "lst" in cpu and "full" in cpu:
        gap = 100 * (cpu["full"]["accuracy"] - cpu["lst"]["accuracy"])
        add("LST accuracy vs full fine-tuning, MiniLM + Rotten Tomatoes (CPU run)",
            f"{abs(gap):.1f} points {'below' if gap >= 0 else 'above'}", "within 1.5 points", gap <= 1.5)
        r = cpu["lst"]["activation_peak_bytes"] / cpu["full"]["activation_peak_bytes"]
        add("LST activation peak / full, MiniLM 32 × 128, CPU tracker (SDPA backbone, side follows it)", f"{r:.2f}",
            "≤ 0.35", r <= 0.35)
        if "lora" in cpu:
            r = cpu["lst"]["peak_bytes"] / cpu["lora"]["peak_bytes"]
            add("LST peak / LoRA peak, MiniLM 32 × 128, CPU tracker", f"{r:.2f}", "≤ 0.5", r <= 0.5)
    if "lst" in gpu:
        r = gpu["lst"]["activation_peak_bytes"] / gpu["full"]["activation_peak_bytes"]
        add("LST activation peak / full, MiniLM shape 32 × 128, H100, eager attention", f"{r:.2f}", "≤ 0.35", r <= 0.35)
        r = gpu["lst"]["peak_bytes"] / gpu["lora"]["peak_bytes"]
        add("LST peak / LoRA peak, MiniLM shape 32 × 128, H100, eager attention", f"{r:.2f}", "≤ 0.5", r <= 0.5)
    if "lst" in t5:
        r = t5["lst"]["peak_bytes"] / t5["full"]["peak_bytes"]
        add("LST peak / full, T5-base 100 × 128 fp32, H100 (paper: 5.5 / 17.6 = 0.31)", f"{r:.2f}", "≈ 0.31",
            abs(r - 0.31) <= 0.1)
    for m in ("meft1", "meft2", "meft3"):
        for label, rec in (("CPU MiniLM 32 × 128", cpu), ("H100 BERT-base 16 × 512", _cuda("bertbase-b16-l512-fp32"))):
            if m in rec and "full" in rec:
                cut = 1 - rec[m]["activation_peak_bytes"] / rec["full"]["activation_peak_bytes"]
                add(f"{m} activation memory saved vs full, {label} (paper: up to 84 %)", f"{100 * cut:.0f} %",
                    "up to 84 %", cut > 0.5)
    if "sherl" in cpu:
        for k in ("sherl", "sherl:late_layers=2", "sherl:late_layers=3"):
            if k in cpu:
                r = cpu[k]
                add(f"{k}: activation peak / full and accuracy (CPU MiniLM)",
                    f"{r['activation_peak_bytes'] / cpu['full']['activation_peak_bytes']:.2f}, acc {r['accuracy']:.3f}",
                    "memory grows with late_layers", True)
    memory_targets(cpu, add)
    trunk_cache_targets(add)
    vqa_targets(add)
    rows += ["", "Reasons where a target is missed are in the notes below the tables.", ""]
    return "\n".join(rows)


def vqa_results() -> list[tuple[str, dict]]:
    """(template, results) of each digits-vqa template benchmarks/vqa_compare.py has run, B1 first."""
    return [(path.parent.name.split("-")[-1].upper(), json.loads(path.read_text()))
            for path in sorted(HERE.glob("vqa-digits-*/results.json"))]


def vqa_targets(add) -> None:
    """docs/methods/vl.md §5.11 per trained method on each digits-vqa template (benchmarks/vqa_compare.py)."""
    for template, data in vqa_results():
        chance = data.get("chance", 0.5)
        for c in data.get("controls", []):
            mean = {k: sum(c[k]) / len(c[k]) for k in ("both", "image", "question")}
            add(f"{c['label']} on digits-vqa/{template}: both modalities vs the better single-modality control "
                f"(controls vs chance {chance:g})", f"{mean['both']:.3f} vs {max(mean['image'], mean['question']):.3f} "
                f"({c['beats_controls_by'] * 100:+.1f} pts; controls {mean['image']:.3f}, {mean['question']:.3f})",
                f"≥ +15 pts; controls within 3 pts of {chance:g}", c["passes"])


VQA_QUESTIONS = {"B1": '"is this a {c}?", yes/no', "B3": '"is it an even digit?", "is it less than five?" and '
                 'their complements, yes/no'}


def vqa_section() -> str:
    """The offline VQA check with its single-modality controls, per template (benchmarks/vqa_compare.py)."""
    parts = []
    for template, data in vqa_results():
        commands = [*data.get("earlier_commands", []), data["command"]]
        parts += [
            f"## CPU: image + text, DINOv2-S beside MiniLM on digits-vqa/{template}, with single-modality controls", "",
            f"Command: `python benchmarks/vqa_compare.py --template {template}` (one invocation per learning rate: "
            + "; ".join(f"`{c}`" for c in commands) + "). Each trained run is then evaluated with every test image "
            "blanked and with every question emptied (`memtune eval --ablate image|question`)"
            + (f"; `python {data['rescore_command']}` scored every row's three figures again, on the test "
               "questions the controls table counts" if data.get("rescore_command") else "")
            + f". {template} "
            f"({VQA_QUESTIONS.get(template, 'docs/methods/vl.md §6')}) is at {data.get('chance', 0.5):g} for either "
            "modality alone; the last column is the range a rule reading only the question reaches on the "
            "scored questions (a stratified subset keeps the answers' shares, not each wording's). The first "
            "table's accuracy is each run's own test score, on the test questions its command names (rows "
            "without --test-limit: all 500); the controls table scores a row's three figures on one set of "
            "questions. Budget: one CPU thread per run on a shared 2-core machine, one seed per method (the "
            "interval needs more seeds than the session allowed); memory: one step at the training shape on the "
            "CPU tracker.", "",
            (HERE / f"vqa-digits-{template.lower()}" / "results.md").read_text().strip(), "", *init_probe(template)]
    return "\n".join(parts)


def init_probe(template: str) -> list[str]:
    """What each method's features carry before training on one template (benchmarks/vqa_init_probe.py)."""
    folder = HERE / f"vqa-digits-{template.lower()}"
    if not (folder / "init_probe.json").exists():
        return []
    data = json.loads((folder / "init_probe.json").read_text())
    commands = "; ".join(f"`{c}`" for c in data["commands"])
    return [f"What a head can read off each method's features at initialisation ({commands}): test accuracy of a "
            f"ridge probe (lambda {data['ridge']:g}, standardised features) for the question wording, the image's "
            f"class (C1 examples) and {template}'s answer, which needs both; one seed.", "",
            (folder / "init_probe.md").read_text().strip(), ""]


def retrieval_section() -> str:
    """SHERL's retrieval form on real weights (benchmarks/retrieval_captions.py)."""
    path = HERE / "retrieval-digits-captions" / "results.json"
    if not path.exists():
        return ""
    data = json.loads(path.read_text())
    return "\n".join([
        "## CPU: SHERL retrieval (two towers), DINOv2-S and MiniLM on digits-captions", "",
        "Command: `python benchmarks/retrieval_captions.py` (" + "; ".join(f"`{c}`" for c in data["commands"]) + "). "
        "Recall@k on 500 test images and their captions, both ways (i2t: image → caption), a hit being an item of "
        "the query's class; rsum is the sum of the six. Budget: one CPU thread, one seed.", "",
        (HERE / "retrieval-digits-captions" / "results.md").read_text().strip(), ""])


def trunk_cache_targets(add) -> None:
    """Issue 20: with the trunk cache, epochs 2+ of each side method take ≤ 0.25 × full fine-tuning's epoch."""
    path = HERE / "side_trunk_cache.json"
    if not path.exists():
        return
    d = json.loads(path.read_text())
    for r in d["rows"]:
        if "later_over_full" in r:
            add(f"{r['method']} with the trunk cache: epochs 2+ / full fine-tuning's epoch, {d['model']} "
                f"{d['examples']} examples, batch {d['batch_size']} × ≤{d['max_length']}, CPU "
                "(`benchmarks/side_trunk_cache.py`)", f"{r['later_over_full']:.3f}", "≤ 0.25",
                r["later_over_full"] <= 0.25)


def feeds_trunk(option: str) -> bool:
    """Options that say how a run fed the frozen trunk (the trunk cache and the eval-mode trunk it needs): they
    change the time of epochs 2+, not what the method trains."""
    return option.startswith("cache_") or option == "trunk_dropout"


def grid_note(r: dict) -> str:
    """' (lr grid: 0.0009 val 0.871, 0.003 val 0.880 → 0.003)' for a record whose learning rate a grid chose on
    the validation carve-out, else ''."""
    if not r.get("lr_grid"):
        return ""
    tried = ", ".join(f"{lr} val {v:.3f}" if v is not None else f"{lr} failed" for lr, v in r["lr_grid"].items())
    return f" (lr grid: {tried} → {r['lr_selected']:g})"


def recipe_note(r: dict) -> str:
    """How a convergence record's recipe departs from its task's: longer training with the best validation epoch
    tested (' (10 epochs, best validation epoch)'), then its learning-rate grid (`grid_note`)."""
    s, note = r["settings"], ""
    if s.get("select_best"):
        note = f" ({s['epochs']:g} epochs, best validation epoch)"
    return note + grid_note(r)


def recipe_name(r: dict) -> str:
    """A convergence record's short name: its label without how it fed the frozen trunk, with its techniques
    and learning-rate grid ('lst:cache_trunk=true:trunk_dropout=false:cache_dtype=bf16:r=4' → 'lst:r=4')."""
    spec, *techniques = r["label"].split("+")
    method, *options = spec.split(":")
    kept = [o for o in options if not feeds_trunk(o.split("=")[0])]
    return ":".join([method, *kept]) + "".join("+" + t for t in techniques) + recipe_note(r)


def convergence_targets(add) -> None:
    """Accuracy at convergence (mean of 3 seeds): every memory-efficient method within 1 point of full fine-tuning
    (issue 13) and the side methods within 1 point of LoRA + checkpointing (issue 20)."""
    for task, title in SHORT.items():
        done = {}
        for f in sorted((HERE / "convergence" / task).glob("*.json")):
            for r in json.loads(f.read_text())["records"]:
                if "error" not in r and r.get("accuracy_mean") is not None:
                    done[recipe_name(r)] = r
        full, gc = done.get("full"), done.get("lora+gc")
        for name, r in done.items():
            if name == "full" or r["method"] == "linear":
                continue
            n = len(r["accuracy_per_seed"])
            seeds = f"{n} seed{'s' if n > 1 else ''}"
            ci = f" ± {r['accuracy_ci95']:.3f}" if r.get("accuracy_ci95") else ""
            if full:
                gap = 100 * (full["accuracy_mean"] - r["accuracy_mean"])
                add(f"{name} accuracy vs full fine-tuning at convergence, {title} ({seeds})",
                    f"{r['accuracy_mean']:.3f}{ci}: {abs(gap):.1f} points {'below' if gap >= 0 else 'above'}",
                    "within 1 point", gap <= 1.0)
            if gc and r["method"] in ("lst", "sherl", "qst"):
                gap = 100 * (gc["accuracy_mean"] - r["accuracy_mean"])
                add(f"{name} accuracy vs LoRA+gc at convergence, {title} ({seeds})",
                    f"{abs(gap):.1f} points {'below' if gap >= 0 else 'above'}", "within 1 point", gap <= 1.0)
        # The probe at convergence: the best of its recipes (a probe trained longer only gets stronger).
        probes = {name: r for name, r in done.items() if r["method"] == "linear"}
        if probes and task.startswith("dinov2"):
            probe_name, probe = max(probes.items(), key=lambda kv: kv[1]["accuracy_mean"])
            for name, r in done.items():
                if r["method"] in ("lst", "dtl"):
                    d = r["accuracy_mean"] - probe["accuracy_mean"]
                    add(f"{name} at or above the linear probe ({probe_name}: {probe['accuracy_mean']:.3f}), {title}",
                        f"{100 * d:+.1f} points", "≥ 0", d >= 0)


def _planned(title_start: str) -> dict:
    path = HERE / "plan_large.json"
    if not path.exists():
        return {}
    for w in json.loads(path.read_text())["workloads"]:
        if w["title"].startswith(title_start):
            return {r["label"]: r for r in w["records"] if r["status"] == "ok"}
    return {}


def memory_targets(cpu: dict, add) -> None:
    """The memory-technique and side-method targets (against LoRA + checkpointing and QLoRA + checkpointing)."""
    if "lora" in cpu and "lora+gc" in cpu:
        r = cpu["lora+gc"]["activation_peak_bytes"] / cpu["lora"]["activation_peak_bytes"]
        add("lora+gc activation peak / lora's, MiniLM 32 × 128, CPU tracker", f"{r:.2f}", "≤ 0.4", r <= 0.4)
    times = {label: r["step_time_s"] for label, r in cpu.items() if r.get("step_time_s")}
    gc = cpu.get("lora+gc")
    side = [label for label, r in cpu.items() if r.get("method") in ("lst", "sherl", "qst")]
    if gc and side:
        best = min(side, key=lambda m: cpu[m]["peak_bytes"])
        r = cpu[best]["peak_bytes"] / gc["peak_bytes"]
        add(f"best side method's peak ({best}) / LoRA+gc's, MiniLM 32 × 128, CPU tracker", f"{r:.2f}", "≤ 0.8", r <= 0.8)
        if best in times and "lora+gc" in times:
            t = times[best] / times["lora+gc"]
            add(f"{best} step time / LoRA+gc's, MiniLM 32 × 128 (CPU time, one thread)", f"{t:.2f}", "≤ 0.5", t <= 0.5)
        gap = 100 * (gc["accuracy"] - cpu[best]["accuracy"])
        add(f"{best} accuracy vs LoRA+gc, MiniLM + Rotten Tomatoes (one seed)",
            f"{abs(gap):.1f} points {'below' if gap >= 0 else 'above'}", "within 1 point", gap <= 1.0)
    convergence_targets(add)
    small = _planned("smollm2-135m, 8 × 1024")
    for label in (k for k in small if k.startswith("qst")):
        ref = small.get(qlora_gc_for(label))
        if ref is None:
            continue
        r = small[label]["peak_bytes"] / ref["peak_bytes"]
        t = small[label]["step_time_s"] / ref["step_time_s"]
        add(f"{label} / {ref['label']}, SmolLM2 8 × 1024 bf16 (plan, H100 profile): peak, step time",
            f"{r:.2f}, {t:.2f}", "≤ 0.7, ≤ 0.5", r <= 0.7 and t <= 0.5)
    smollm2_long_targets(add)
    big = _planned("llama-7b")
    best_chunked = "qst:side_checkpointing=true:downsample=avgpool+nf4+chunked_ce"
    if best_chunked in big and QLORA_GC[True] in big:
        q, ref = big[best_chunked], big[QLORA_GC[True]]
        r, t = q["peak_bytes"] / ref["peak_bytes"], q["step_time_s"] / ref["step_time_s"]
        add(f"{best_chunked} / {ref['label']}, 7B Llama 4 × 2048 bf16 (plan, H100 profile; the SmolLM2 targets): "
            "peak, step time", f"{r:.2f}, {t:.2f}", "≤ 0.7, ≤ 0.5", r <= 0.7 and t <= 0.5)
    if "qst+nf4" in big:
        best = min((k for k in big if k.startswith("qst")), key=lambda k: big[k]["peak_bytes"])
        add(f"QST fits 12 GiB, 7B Llama 4 × 2048 bf16 (plan): qst+nf4; best QST row ({best})",
            f"{big['qst+nf4']['peak_bytes'] / GIB:.2f} GiB; {big[best]['peak_bytes'] / GIB:.2f} GiB", "≤ 12 GiB",
            big[best]["peak_bytes"] <= 12 * GIB)
        q = big["qst+nf4"]
        if q.get("quantized_weight_bytes") and q.get("linear_weight_fp32_bytes"):
            r = q["quantized_weight_bytes"] / q["linear_weight_fp32_bytes"]
            add("NF4 weight bytes (packed + constants) / fp32 weights of the same layers, 7B plan", f"{r:.3f}",
                "≤ 0.3", r <= 0.3)


def smollm2_section() -> str:
    path = HERE / "smollm2_causal_lm.json"
    if not path.exists():
        return ""
    rows = json.loads(path.read_text())
    st = rows[0]["settings"]
    out = ["## CPU: SmolLM2-135M, a short causal-LM fine-tune on the Rotten Tomatoes texts", "",
           f"`memtune train --model smollm2-135m --task rotten-tomatoes --objective causal-lm --method METHOD "
           f"--max-steps {st['max_steps']} --batch-size {st['batch_size']} --max-length {st['max_length']} "
           f"--train-limit {st['train_limit']} --test-limit {st['test_limit']} --eval-before --measure-memory`; "
           f"loss and perplexity on the {st['test_limit']} test texts before and after; memory of one step at "
           f"batch {st['batch_size']} × {st['max_length']} (CPU tracker). The weights are dequantized from a 4-bit GGUF "
           "file, so absolute perplexities are not comparable with the original model's. Activation peaks at "
           "256 and 1024 tokens are in the H100 tables above.", "",
           "| method | trainable | loss before → after | perplexity before → after | peak GiB | activation peak GiB | "
           "s/step |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['trainable_params']:,} | {r['before']['eval_loss']:.3f} → "
                   f"{r['after']['eval_loss']:.3f} | {r['before']['perplexity']:.1f} → {r['after']['perplexity']:.1f} | "
                   f"{r['peak_bytes'] / GIB:.3f} | {r['activation_peak_bytes'] / GIB:.3f} | {r['step_time_s']:.2f} |")
    out.append("")
    return "\n".join(out)


SMOLLM2_LONG = ("smollm2_long_cpu.json", "smollm2_long_cpu_fp32.json")     # bf16 autocast, fp32


def _smollm2_long() -> list[dict]:
    return [json.loads(p.read_text()) for p in (HERE / n for n in SMOLLM2_LONG) if p.exists()]


def _cpu_kind(w: dict) -> str:
    bf16 = w.get("cpu_bf16")
    return {True: "a CPU with bf16 instructions", False: "a CPU without bf16 instructions, AVX2 only"}.get(
        bf16, "an earlier machine's CPU, its bf16 support not recorded")


def smollm2_long_targets(add) -> None:
    """QST against QLoRA + checkpointing at SmolLM2's long shape, measured on a CPU (both rows chunked)."""
    for data in _smollm2_long():
        w, peer = data["workload"], data["rows"][data["peer"]]
        for label, r in data["rows"].items():
            if label == data["peer"] or "peak_vs_peer" not in r:
                continue
            p, t = r["peak_vs_peer"], r["time_vs_peer"]
            add(f"{r['spec']} / {peer['spec']}, SmolLM2 {w['batch_size']} × {w['max_length']} {w['precision']} (CPU "
                f"tracker, CPU time of one thread; {_cpu_kind(w)}): peak, step time", f"{p:.2f}, {t:.2f}",
                "≤ 0.7, ≤ 0.5", p <= 0.7 and t <= 0.5)


def smollm2_long_section() -> str:
    return "\n".join(_smollm2_long_table(data) for data in _smollm2_long())


def _smollm2_long_table(data: dict) -> str:
    w, rows = data["workload"], data["rows"]
    peer = rows[data["peer"]]
    bf16 = w["precision"] == "bf16"
    command = "python benchmarks/smollm2_long_cpu.py" + ("" if bf16 else " --precision fp32 --steps 2") + (
        "" if w["batch_size"] == 8 else f" --batch-size {w['batch_size']}")
    out = [f"## CPU: SmolLM2-135M causal LM at {w['batch_size']} × {w['max_length']} {w['precision']}, QST against "
           "QLoRA + checkpointing", "",
           f"Command: `{command}`, on {_cpu_kind(w)}. Real text (Rotten Tomatoes snippets joined into rows "
           f"of exactly {w['max_length']} tokens, every token a target), "
           + ("bf16 autocast over fp32 weights" if bf16 else "fp32 throughout (no autocast)") +
           ", NF4 frozen base (bitsandbytes' CPU backend), AdamW, the chunked loss in every row. Peak: the live-bytes "
           f"tracker over one step; time: {data['timing']}. Planned: `memtune plan --device cpu --precision "
           f"{'bf16-amp' if bf16 else 'fp32'} --attn sdpa` (SmolLM2 loads with PyTorch's fused attention) for the "
           "same rows.", "",
           "| row | trainable | peak GiB | × QLoRA+gc peak | planned peak GiB | s/step | × QLoRA+gc time | "
           "planned s/step |", "|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        if "error" in r:
            out.append(f"| {r['spec']} | failed: {' '.join(r['error'])[:100]} |||||||")
            continue
        out.append(f"| {r['spec']} | {r['trainable_params']:,} | {r['peak_bytes'] / GIB:.3f} | "
                   f"{ratio(r['peak_bytes'], peer['peak_bytes'])} | {r['plan']['peak_bytes'] / GIB:.3f} | "
                   f"{r['step_time_s']:.1f} | {ratio(r['step_time_s'], peer['step_time_s'])} | "
                   f"{r['plan']['step_time_s']:.1f} |")
    out.append("")
    return "\n".join(out)


def glue_t5_section() -> str:
    """The LST paper's GLUE protocol, text-to-text (benchmarks/glue_t5.py): per task × method the test metric of
    the generated label words (mean ± 95 % half-width over seeds), constrained scoring's accuracy, the share of
    outputs that were no label word, and the planned step peak at the run's shapes."""
    path = HERE / "glue_t5.json"
    if not path.exists():
        return ""
    d = json.loads(path.read_text())
    what = ("tiny-t5 (random weights) on a generated GLUE-format copy: a check that the protocol runs end to end "
            "here, not the paper's accuracy" if d["smoke"] else f"{d['model']} on the user's GLUE copy")
    out = ["## T5 text-to-text on GLUE (the LST paper's protocol)", "",
           f"Command: `{d['command']}` ({what}; {d['seconds'] / 60:.0f} minutes on this machine). Each class is "
           f"generated as its label words through the frozen tied LM head; target length {d['target_length']} "
           "tokens with EOS. Metric = the task's main metric of the generated words (no label word = wrong); "
           "scored = accuracy of the likeliest label word (constrained scoring); plan = one training step's peak "
           "(`memtune plan --objective seq2seq`) at the run's batch and lengths.", "",
           "| task | method | metric | mean ± 95 % | scored accuracy | no label word | plan peak MiB |",
           "|---|---|---|---|---|---|---|"]
    for r in d["summary"]:
        ci = "" if r["ci95"] is None else f" ± {r['ci95']:.3f}"
        peak = d["plan"].get(r["method"], {}).get("peak_bytes")
        out.append(f"| {r['task']} | {r['method']} | {r['metric']} | {r['mean']:.3f}{ci} | "
                   f"{r['accuracy_scored_mean']:.3f} | {r['invalid_generations_mean']:.2f} | "
                   f"{'–' if peak is None else f'{peak / 2 ** 20:.1f}'} |")
    out.append("")
    return "\n".join(out)


CONVERGENCE = {"minilm-rotten-tomatoes": "MiniLM on the full Rotten Tomatoes training split (10,174 / 2,578), 2 epochs",
               "dinov2s-fashion-mnist": "DINOv2-S on 5,000 / 5,000 Fashion-MNIST images at 112 px, 3 epochs"}
BUDGET = {"minilm-rotten-tomatoes": "about 15 minutes per seed for full fine-tuning",
          "dinov2s-fashion-mnist": "wall times in the table"}
SHORT = {"minilm-rotten-tomatoes": "MiniLM + Rotten Tomatoes", "dinov2s-fashion-mnist": "DINOv2-S + Fashion-MNIST"}


def selected_rows_note(task: str) -> str:
    return (f" Rows marked \"(N epochs, best validation epoch)\": `python benchmarks/convergence.py --task "
            f"{task.split('-')[0]} --methods M --epochs N --select-best` (the LST / SHERL / QST recipes: 10 % of the "
            "training data held out, the validation split scored after every epoch and the best epoch's weights "
            "tested; the label lists the epoch each seed picked).")


def convergence_section() -> str:
    """Accuracy over several seeds (mean ± 95 % half-width) per method: one JSON per method from
    benchmarks/convergence.py, which may have finished only some of its methods."""
    out = []
    for task, title in CONVERGENCE.items():
        files = sorted((HERE / "convergence" / task).glob("*.json"))
        records = [r for f in files for r in json.loads(f.read_text())["records"]]
        if not records:
            continue
        done = [r for r in records if "error" not in r]
        s = done[0]["settings"]
        gc = next((r for r in done if r["label"] == "lora+gc"), None)
        shape = f"{s['batch_size']} × {s['max_length']}" if s.get("image_size") is None else \
            f"{s['batch_size']} images of {s['image_size']} px"
        step = (f"{s['memory_batch_size']} × {s['memory_max_length']}" if s.get("memory_batch_size") else shape)
        out += [f"## CPU: accuracy at convergence, {title}", "",
                f"Command: `python benchmarks/convergence.py --task {task.split('-')[0]}` (each method: `memtune compare "
                f"--methods M --seeds 0,1,2`, batch {shape}, {s['epochs']:g} epochs, default "
                f"learning rates, {s['precision']}; side methods replay the frozen trunk from epoch 2). Budget: one "
                f"CPU thread per run, {BUDGET[task]}; methods not listed did not finish "
                "within the session, and a row with one seed (no interval) is all the session had time for; wall "
                "times (training and evaluation of one seed) were taken while other jobs shared the "
                f"two cores. Interval: 95 % Student t over the seeds. Peak: one step at batch {step} (CPU tracker)."
                + (selected_rows_note(task) if any(r["settings"].get("select_best") for r in done) else ""), "",
                "| method | accuracy per seed | mean ± 95 % | vs full | peak GiB (vs LoRA+gc) | steps | wall s, seed 0 |",
                "|---|---|---|---|---|---|---|"]
        full = next((r for r in done if r["label"] == "full"), None)
        for r in records:
            if "error" in r:
                out.append(f"| {r['label']} | failed: {r['error'][:100]} |||||")
                continue
            ci = f" ± {r['accuracy_ci95']:.3f}" if r.get("accuracy_ci95") is not None else ""
            gap = f"{(r['accuracy_mean'] - full['accuracy_mean']) * 100:+.1f} pt" if full else "–"
            peak = f"{r['peak_bytes'] / GIB:.3f} ({ratio(r['peak_bytes'], gc['peak_bytes']) if gc else '–'}×)"
            seeds = ", ".join(f"{a:.3f}" for a in r["accuracy_per_seed"])
            picks = r.get("best_epoch_per_seed")
            label = r["label"] + recipe_note(r)
            if picks:
                label += f" (epochs picked: {', '.join(f'{e:g}' for e in picks)})"
            if r.get("partial"):
                label += f" ({len(r['seeds'])} seed{'s' if len(r['seeds']) > 1 else ''}: interrupted)"
            out.append(f"| {label} | {seeds} | {r['accuracy_mean']:.3f}{ci} | {gap} | {peak} | {r['steps']} | {r['wall_time_s']:.0f} |")
        out.append("")
    return "\n".join(out)


def _recipe(r: dict) -> tuple:
    """What a run trained, without how it fed the frozen trunk: the trunk cache (and the eval-mode trunk it
    needs) changes the time of epochs 2+, not the method; a README row and a convergence row compare on this."""
    options = {k: v for k, v in (r.get("config") or {}).items() if not feeds_trunk(k)}
    return r["method"], tuple(r.get("techniques") or ()), json.dumps(options, sort_keys=True), recipe_note(r)


def convergence_by_recipe(task: str) -> dict:
    files = sorted((HERE / "convergence" / task).glob("*.json"))
    return {_recipe(r): r for f in files for r in json.loads(f.read_text())["records"] if "error" not in r}


def readme_table() -> str:
    """The README's short results table (CPU MiniLM run + the H100 T5-base LST setting), between markers; the
    accuracy at convergence (mean ± 95 % over 3 seeds) where the convergence benchmark ran the row's recipe."""
    cpu = _by_label(HERE / "minilm-rotten-tomatoes" / "results.json")
    converged = convergence_by_recipe("minilm-rotten-tomatoes")
    t5 = _cuda("t5base-b100-l128-fp32")
    times = {label: r["step_time_s"] for label, r in cpu.items() if r.get("step_time_s")}
    gc = cpu.get("lora+gc")
    rows = ["| method | trainable | peak vs full (MiniLM, CPU) | peak vs LoRA+gc | activation peak vs full | "
            "step time vs LoRA+gc | accuracy, full split, 3 seeds | accuracy, 3,000 ex., 1 seed | "
            "peak vs full (T5-base, H100) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for label, r in cpu.items():
        m = r.get("method", label)
        t = f"{t5[m]['peak_bytes'] / t5['full']['peak_bytes']:.2f}" if label == m and m in t5 else "–"
        vs_gc = f"{r['peak_bytes'] / gc['peak_bytes']:.2f}" if gc else "–"
        time_gc = f"{times[label] / times['lora+gc']:.2f}" if label in times and "lora+gc" in times else "–"
        c = converged.get(_recipe(r))
        conv = f"{c['accuracy_mean']:.3f} ± {c['accuracy_ci95']:.3f}" if c and c.get("accuracy_ci95") else "–"
        rows.append(f"| {label} | {r['trainable_pct']:.2f} % | {r['peak_ratio_vs_full']:.2f} | {vs_gc} | "
                    f"{r['activation_ratio_vs_full']:.2f} | {time_gc} | {conv} | {r['accuracy']:.3f} | {t} |")
    return "\n".join(rows)


def update_readme() -> None:
    readme = HERE.parent / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        readme.write_text(head + start + "\n" + readme_table() + "\n" + end + rest.split(end, 1)[1])


def main():
    parts = ["# memtune benchmark results\n",
             "Every table is generated by `python benchmarks/make_results.py` from the JSON files in this folder; "
             "the commands that made them are given with each table. GiB = 2³⁰ bytes.", ""]
    parts.append(cpu_section("minilm-rotten-tomatoes", "CPU: MiniLM on Rotten Tomatoes (the README's main job)"))
    parts.append(cpu_section("dinov2s-fashion-mnist", "CPU: DINOv2-S on Fashion-MNIST (fixed 2,000 / 400 subset, 112 px, "
                                                      "80 steps)"))
    parts.append(convergence_section())
    parts.append(vqa_section())
    parts.append(retrieval_section())
    parts.append(step_time_section())
    parts.append(plan_large_section())
    parts.append(smollm2_section())
    parts.append(smollm2_long_section())
    parts.append(glue_t5_section())
    parts.append(cuda_section())
    parts.append(targets_section())
    for extra in ("notes.md", "plan_lst_table.md", "plan_clip_t5.md", "dtl_trunk_cache.md"):
        if (HERE / extra).exists():
            parts.append((HERE / extra).read_text().strip() + "\n")
    (HERE / "RESULTS.md").write_text("\n".join(p for p in parts if p) + "\n")
    update_readme()


if __name__ == "__main__":
    main()

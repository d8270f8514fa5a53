"""Epoch times of the side methods with the trunk cache, next to full fine-tuning's epoch time.

    python benchmarks/side_trunk_cache.py                       # minilm + rotten-tomatoes, 256 examples, 16 × 64
    python benchmarks/side_trunk_cache.py --model tiny-bert --examples 64 --methods lst,dtl

Every method trains `--epochs` epochs over the same pre-collated batches (each with `example_id`), in a
seeded new batch order every epoch. Side methods run with `cache_trunk=true` (LST and SHERL also with
`trunk_dropout=false`, which the cache needs on a backbone with dropout), so epoch 1 fills the cache and
epochs 2+ replay it. Printed (and written to --json, default benchmarks/side_trunk_cache.json): seconds per
epoch, and epochs 2+ as a fraction of full fine-tuning's mean epoch.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import memtune
from dtl_trunk_cache import real_batches
from memtune.methods import config_for

CACHED = {"lst": {"cache_trunk": True, "trunk_dropout": False},
          "sherl": {"cache_trunk": True, "trunk_dropout": False},
          "dtl": {"cache_trunk": True}}


def train(loaded, num_labels, batches, method, opts, epochs):
    torch.manual_seed(0)
    model = memtune.wrap(loaded, config_for(method, opts), num_labels=num_labels).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    times = []
    for epoch in range(epochs):
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(epoch)).tolist()
        t0 = time.perf_counter()
        for i in order:
            loss = model(**batches[i]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times, getattr(model, "cache_bytes", 0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--methods", default="lst,sherl,dtl")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=str(Path(__file__).resolve().parent / "side_trunk_cache.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded, num_labels, batches = real_batches(args.model, args.examples, args.batch_size, None, args.max_length)
    side = {m: train(loaded, num_labels, batches, m, CACHED[m], args.epochs) for m in args.methods.split(",")}
    full, _ = train(loaded, num_labels, batches, "full", {}, args.epochs)   # last: it changes the backbone
    base = statistics.mean(full)
    print(f"{args.model}: {args.examples} examples, batch {args.batch_size} × ≤{args.max_length}, "
          f"{torch.get_num_threads()} threads")
    print(f"  full   epochs {', '.join(f'{t:.2f}s' for t in full)}")
    rows = [{"method": "full", "epoch_s": full}]
    for method, (times, cache) in side.items():
        later = statistics.mean(times[1:])
        print(f"  {method:6s} epochs {', '.join(f'{t:.2f}s' for t in times)}   epochs 2+ = {later / base:.3f} × full's "
              f"epoch; cache {cache / 2**20:.1f} MiB")
        rows.append({"method": method, "options": CACHED[method], "epoch_s": times, "later_over_full": later / base,
                     "cache_bytes": cache})
    Path(args.json).write_text(json.dumps({
        "command": "python benchmarks/side_trunk_cache.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "json" and v is not None),
        "model": args.model, "examples": args.examples, "batch_size": args.batch_size, "max_length": args.max_length,
        "epochs": args.epochs, "threads": torch.get_num_threads(), "rows": rows,
        "versions": {"torch": torch.__version__}}, indent=2) + "\n")

if __name__ == "__main__":
    main()

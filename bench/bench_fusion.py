"""Serving a fused model: greedy batch-1 decode of K fused specialists against the base model alone, one run.

K LoRA specialists (r = 16 on every linear layer of the default model, random
non-zero factors) fused by a gate, decoded two ways:

- adapter rows: the K specialists as K rows of one batched forward of the base
  (`AdapterSpecialists`), the base weights read once per step;
- K full models: each specialist merged into its own copy of the base, each
  with its KV cache (`ModelSpecialists`), K times one model's work, as the
  UltraFuser paper serves it.

Prints the time per generated token of the base, of each fused path, and their
ratios to the base (the fused paths' outputs are checked equal first).

    python bench/bench_fusion.py [--specialists 3] [--rank 16] [--new 32] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from bench_multi_adapter import make_adapters

import bricks
from bricks.adapters import AdapterBrick
from bricks.fusion import FusedModel, ModelSpecialists, fuse
from record import save


def per_token(generators: list, new: int, reps: int) -> list[float]:
    """Best time per token of each generator over `reps` rounds, the generators taking turns within each round:
    a slow phase of this shared machine then falls on all of them, not on whichever ran during it."""
    best = [float("inf")] * len(generators)
    for _ in range(reps):
        for i, generate in enumerate(generators):
            t = time.perf_counter()
            with torch.no_grad():
                generate()
            best[i] = min(best[i], time.perf_counter() - t)
    return [b / new for b in best]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--specialists", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--new", type=int, default=32, help="tokens generated")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args()
    base, tok = bricks.load_model("default")
    ids = tok("def fibonacci(n):", return_tensors="pt").input_ids
    with tempfile.TemporaryDirectory() as tmp:
        dirs = make_adapters(a.specialists, a.rank, Path(tmp))
        rows, _ = fuse([str(d) for d in dirs], base="default")
        torch.nn.init.normal_(rows.gate.second.weight, std=0.1)
        models = []
        for d in dirs:
            m, _ = bricks.load_model("default")
            AdapterBrick.load(d).merge_into(m)
            models.append(m)
    full = FusedModel(ModelSpecialists(models, rows.names), gate=rows.gate)
    with torch.no_grad():
        out_rows, out_full = rows.generate(ids, a.new), full.generate(ids, a.new)
    agree = torch.equal(out_rows, out_full)
    t_base, t_rows, t_full = per_token([
        lambda: base.generate(ids, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False,
                              pad_token_id=tok.eos_token_id),
        lambda: rows.generate(ids, a.new), lambda: full.generate(ids, a.new)], a.new, a.reps)
    res = {"args": vars(a), "same_tokens_both_paths": agree, "base_ms_per_token": 1e3 * t_base,
           "adapter_rows_ms_per_token": 1e3 * t_rows, "full_models_ms_per_token": 1e3 * t_full,
           "adapter_rows_over_base": t_rows / t_base, "full_models_over_base": t_full / t_base}
    print(f"base {1e3 * t_base:.1f} ms/token; fused {a.specialists} specialists as adapter rows {1e3 * t_rows:.1f} ms "
          f"(x{t_rows / t_base:.2f}), as full models {1e3 * t_full:.1f} ms (x{t_full / t_base:.2f}); "
          f"same tokens both ways: {agree}")
    save(a.json, res, base)


if __name__ == "__main__":
    main()

"""Benchmark: end-to-end greedy decoding, dense vs bricked FFNs, on a TinyLlama-shaped random model or a real one.

22 layers, hidden 2048, FFN 5632 (random weights: speed does not depend on
them), or `--model default` (any model spec); batch 1, greedy, tokens/s of
both in the same run, dense first and bricked second, then the other way
round, keeping each one's best. `--busy N` keeps N other processes busy on the
CPU meanwhile; `--dense-fallback` lets the routed FFNs run the prefill densely
where that is faster (TEAL and CATS sparsify decoding only).

    python bench/bench_decode.py [--active 0.5] [--tokens 32] [--dtype float32] [--router teal] [--model default]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from bricks.brick import BrickSet, model_fingerprint
from bricks.routing import (bricked, calibrate_thresholds, compute_fraction, executed_fraction, set_dense_fallback,
                            sparsified)
from bricks.routing.bench import competing_processes
from record import save


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--active", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--bricks", type=int, default=64)
    p.add_argument("--router", default="centroid")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--model", default=None, help="a model spec (e.g. default) instead of the random TinyLlama shape")
    p.add_argument("--busy", type=int, default=0, help="other processes kept busy on the CPU meanwhile")
    p.add_argument("--dense-fallback", action="store_true")
    p.add_argument("--selection", default="topk", choices=("topk", "threshold"),
                   help="teal's; thresholds calibrated on random token windows (speed does not depend on them)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from bricks.loading import parse_dtype

    torch.manual_seed(0)
    if a.model:
        from bricks import load_model

        model, _ = load_model(a.model, dtype=a.dtype)
        model.eval()
    else:
        config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=a.layers, num_attention_heads=32,
                             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
        model = AutoModelForCausalLM.from_config(config, dtype=parse_dtype(a.dtype)).eval()
    c = model.config
    assignments = [torch.randperm(c.intermediate_size) % a.bricks for _ in range(c.num_hidden_layers)]
    bs = BrickSet(assignments, model_fingerprint(model), method="random")
    ids = torch.randint(0, c.vocab_size, (1, 16))

    def decode():
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False)
        assert out.shape[1] == ids.shape[1] + a.tokens
        return a.tokens / (time.perf_counter() - t)

    dense, routed, frac, executed = [], [], None, None
    with competing_processes(a.busy):
        decode()  # warm-up
        for order in ("dense-first", "bricked-first"):
            for which in (("dense", "bricked") if order == "dense-first" else ("bricked", "dense")):
                if which == "dense":
                    dense.append(decode())
                    continue
                # teal: single neurons and inputs by magnitude, --active as the FFN compute fraction
                with sparsified(model, a.active) if a.router == "teal" else bricked(model, bs, router=a.router, active=a.active):
                    set_dense_fallback(model, a.dense_fallback)
                    if a.router == "teal" and a.selection == "threshold":
                        with torch.no_grad():
                            calibrate_thresholds(model, torch.randint(0, c.vocab_size, (8, 64)))
                    decode()  # the routed FFNs time their execution paths (bricks.routing.paths)
                    executed_fraction(model, reset=True)
                    routed.append(decode())
                    frac, executed = compute_fraction(model), executed_fraction(model)
    result = {"model": a.model or "random TinyLlama shape", "layers": c.num_hidden_layers, "hidden": c.hidden_size,
              "d_ff": c.intermediate_size, "dtype": a.dtype, "active": a.active, "router": a.router,
              "bricks": None if a.router == "teal" else a.bricks, "new_tokens": a.tokens, "busy_processes": a.busy,
              "dense_fallback": a.dense_fallback, "selection": a.selection if a.router == "teal" else None, "ffn_compute_fraction": round(frac, 4),
              "ffn_executed_fraction": round(executed, 4),
              "dense_tokens_per_s": round(max(dense), 3), "bricked_tokens_per_s": round(max(routed), 3),
              "speedup": round(max(routed) / max(dense), 3)}
    print(json.dumps(result, indent=1))
    save(a.json, {"args": vars(a), **result}, model)


if __name__ == "__main__":
    main()

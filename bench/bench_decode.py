"""Benchmark: end-to-end greedy decoding, dense vs bricked FFNs, on a Llama-shaped random model or a real one.

By default 22 layers, hidden 2048, FFN 5632 (TinyLlama's shape; random
weights: speed does not depend on them; `--layers/--hidden/--d-ff/--heads`
for others, e.g. Llama-2-7B's 32/4096/11008/32), or `--model default` (any
model spec); batch 1, greedy, tokens/s of both in the same run, dense first
and bricked second, then the other way round, keeping each one's best.
`--busy N` keeps N other processes busy on the CPU meanwhile;
`--dense-fallback` lets the routed FFNs run the prefill densely where that is
faster (TEAL and CATS sparsify decoding only).

On CUDA (`--device cuda`) every decoding step of both models is captured in a
CUDA graph and replayed (`bricks.decoding.GreedyDecoder`; `--no-graphs` to
launch eagerly), and the routed model's tokens are compared with those of the
same model decoded eagerly.

    python bench/bench_decode.py [--active 0.5] [--tokens 32] [--dtype float32] [--router teal] [--model default]
    python bench/bench_decode.py --device cuda --dtype bfloat16 --layers 32 --hidden 4096 --d-ff 11008 --heads 32 \
        --kv-heads 32 --router teal --selection threshold --tokens 128
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from bricks.brick import BrickSet, model_fingerprint
from bricks.decoding import GreedyDecoder
from bricks.routing import (bricked, calibrate_thresholds, compute_fraction, executed_fraction, set_dense_fallback,
                            sparsified)
from bricks.routing.bench import competing_processes
from record import save


def random_llama(layers=22, hidden=2048, d_ff=5632, heads=32, kv_heads=4, dtype=torch.float32, device="cpu"):
    """A Llama of this shape with random weights (TinyLlama's by default): decode speed does not depend on them."""
    config = LlamaConfig(hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=32000, max_position_embeddings=4096)
    with torch.device(device):  # initialised where it runs: a 7B shape would take minutes on the CPU
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--active", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--bricks", type=int, default=64)
    p.add_argument("--router", default="centroid")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--d-ff", type=int, default=5632)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-graphs", action="store_true", help="on CUDA: launch every step eagerly")
    p.add_argument("--model", default=None, help="a model spec (e.g. default) instead of the random TinyLlama shape")
    p.add_argument("--busy", type=int, default=0, help="other processes kept busy on the CPU meanwhile")
    p.add_argument("--dense-fallback", action="store_true")
    p.add_argument("--selection", default="topk", choices=("topk", "threshold"),
                   help="teal's; thresholds calibrated on random token windows (speed does not depend on them)")
    p.add_argument("--repeats", type=int, default=2, help="timed decodes of each model, alternating; the best of each is compared")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from bricks.loading import parse_dtype

    torch.manual_seed(0)
    if a.model:
        from bricks import load_model

        model, _ = load_model(a.model, dtype=a.dtype, device=a.device)
        model.eval()
    else:
        model = random_llama(a.layers, a.hidden, a.d_ff, a.heads, a.kv_heads, parse_dtype(a.dtype), a.device)
    cuda = a.device.startswith("cuda")
    decoder = GreedyDecoder(model, max_len=16 + a.tokens, graphs=not a.no_graphs) if cuda else None
    c = model.config
    assignments = [torch.randperm(c.intermediate_size) % a.bricks for _ in range(c.num_hidden_layers)]
    bs = BrickSet(assignments, model_fingerprint(model), method="random")
    ids = torch.randint(0, c.vocab_size, (1, 16))

    def decode():
        if decoder is not None:
            decoder(ids, a.tokens)
            return decoder.tokens_per_s()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False)
        assert out.shape[1] == ids.shape[1] + a.tokens
        return a.tokens / (time.perf_counter() - t)

    dense, routed, frac, executed, agreement = [], [], None, None, None
    with competing_processes(a.busy):
        decode()  # warm-up
        for rep in range(a.repeats):  # alternating which goes first: a machine that drifts favours neither
            for which in (("dense", "bricked") if rep % 2 == 0 else ("bricked", "dense")):
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
                    if decoder is not None and agreement is None:  # graphs replay what eager steps compute
                        graphed = decoder(ids, a.tokens)
                        eager = GreedyDecoder(model, max_len=16 + a.tokens, graphs=False)(ids, a.tokens)
                        agreement = float((graphed == eager).float().mean())
    result = {"model": a.model or "random Llama shape", "layers": c.num_hidden_layers, "hidden": c.hidden_size,
              "d_ff": c.intermediate_size, "dtype": a.dtype, "active": a.active, "router": a.router,
              "bricks": None if a.router == "teal" else a.bricks, "new_tokens": a.tokens, "busy_processes": a.busy,
              "dense_fallback": a.dense_fallback, "selection": a.selection if a.router == "teal" else None, "ffn_compute_fraction": round(frac, 4),
              "ffn_executed_fraction": round(executed, 4),
              "device": a.device, "cuda_graphs": cuda and not a.no_graphs,
              "graphed_eager_token_agreement": agreement,
              "dense_tokens_per_s": round(max(dense), 3), "bricked_tokens_per_s": round(max(routed), 3),
              "speedup": round(max(routed) / max(dense), 3),
              "dense_runs": [round(v, 3) for v in dense], "bricked_runs": [round(v, 3) for v in routed]}
    if cuda and a.router == "teal":  # which design of teal's GPU kernel each projection took (timed at its first call)
        from bricks.routing import kernels

        result["kernel_designs"] = kernels.designs_for()
    print(json.dumps(result, indent=1))
    save(a.json, {"args": vars(a), **result}, model)


if __name__ == "__main__":
    main()

"""Benchmark: activation capture with streaming statistics vs a plain forward pass.

Both paths run the same decoder stack over the same token windows in the same
process; the plain pass has no hooks. Repeats alternate the two and keep each
one's fastest time, so that a noisy shared machine hurts both alike.

    python bench/bench_capture.py                 # default model, 3 domains
    python bench/bench_capture.py --model DIR --windows 16 --repeats 5 --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import bricks
from bricks.analysis.capture import capture_stats
from bricks.runtime import batches, run_model
from record import save


def plain(model, ids, batch_size):
    with torch.no_grad():
        for rows in batches(len(ids), batch_size):
            run_model(model, ids[rows])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--windows", type=int, default=16, help="windows per domain")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None, help="also save the result (with command and environment) here")
    args = p.parse_args()

    model, tok = bricks.load_model(args.model, device=args.device, dtype=args.dtype)
    domains = bricks.load_domains(["code=builtin:code", "math=builtin:math", "prose=builtin:prose"], tok, "train",
                                  args.seq_len, args.windows)
    ids = torch.cat([d.windows for d in domains])
    n_layers = len(bricks.ffns(model))
    thresholds = torch.full((n_layers,), 0.01)  # any positive threshold: the cost does not depend on it
    plain(model, ids[: args.batch_size], args.batch_size)  # warm-up
    t_plain, t_capture = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plain(model, ids, args.batch_size)
        t_plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        capture_stats(model, domains, args.batch_size, thresholds, coactivation=True)
        t_capture.append(time.perf_counter() - t0)
    tokens = ids.numel()
    result = {
        "model": args.model, "tokens": tokens, "threads": torch.get_num_threads(),
        "plain_s": min(t_plain), "capture_s": min(t_capture),
        "plain_tokens_per_s": tokens / min(t_plain), "capture_tokens_per_s": tokens / min(t_capture),
        "ratio_capture_over_plain": min(t_capture) / min(t_plain),
        "target": "<= 1.3",
    }
    print(json.dumps(result, indent=1))
    save(args.json, {"args": vars(args), **result}, model)


if __name__ == "__main__":
    main()

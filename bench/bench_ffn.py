"""Benchmark: dense vs bricked FFN latency (batch-1 decode and batch 32), ratios measured in one run.

    python bench/bench_ffn.py                         # 576x1536 and 4096x11008, fp32 and bf16
    python bench/bench_ffn.py --shape 4096x11008 --dtype float32 --json out.json

The same measurement is `bricks bench ffn`.
"""

from __future__ import annotations

import argparse
import json

from bricks.routing.bench import bench_ffn


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", help="HIDDENxD_FF, repeatable (default: 576x1536 and 4096x11008)")
    p.add_argument("--dtype", action="append", help="float32 / bfloat16, repeatable (default: both)")
    p.add_argument("--batch", action="append", type=int, help="default: 1 and 32")
    p.add_argument("--active", action="append", type=float, help="default: 0.5 and 0.25")
    p.add_argument("--bricks", type=int, default=64)
    p.add_argument("--router", default="centroid")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shape] if a.shape else ((576, 1536), (4096, 11008))
    rows = bench_ffn(shapes, a.dtype or ("float32", "bfloat16"), a.batch or (1, 32), a.active or (0.5, 0.25),
                     a.bricks, a.router, a.reps, a.device)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()

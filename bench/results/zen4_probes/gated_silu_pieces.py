"""Probe (2026-12-03 session): `cpu_kernels.gated_silu` of bf16 gate|up values `[rows, 2 * size]`, 40 calls.

    PYTHONPATH=. python bench/results/zen4_probes/gated_silu_pieces.py 131072 24    # the bricks' masked path, 2048 tokens x 64 bricks
    PYTHONPATH=. python bench/results/zen4_probes/gated_silu_pieces.py 2048 1536    # one FFN's 2048 tokens

The A/B of converting each thread's rows in pieces of ~4096 values (alternating processes): output_gated_silu.txt.
"""

import sys
import time

import torch

from bricks.routing import cpu_kernels

torch.manual_seed(0)
rows, size = int(sys.argv[1]), int(sys.argv[2])
h = torch.randn(rows, 2 * size).bfloat16()
cpu_kernels.gated_silu(h, size)
times = []
for _ in range(40):
    start = time.perf_counter()
    cpu_kernels.gated_silu(h, size)
    times.append(time.perf_counter() - start)
print(rows, size, "min %.3f median %.3f ms" % (min(times) * 1e3, sorted(times)[20] * 1e3))

"""Probe (2026-12-03 session): `cpu_kernels.top_magnitudes` of a prefill's activations [2048, 1536], keep 0.3.

    PYTHONPATH=. python bench/results/zen4_probes/top_magnitudes_bf16.py bf16 1 60   # dtype, threads, calls

The A/B of `kth_largest_key`'s early stop ran it in alternating processes: output_top_magnitudes.txt.
"""

import sys
import time

import torch

from bricks.routing import cpu_kernels

torch.manual_seed(0)
dtype = torch.bfloat16 if sys.argv[1] == "bf16" else torch.float32
a = (torch.nn.functional.silu(torch.randn(2048, 1536)) * torch.randn(2048, 1536)).to(dtype)
k = int(0.3 * 1536)
threads = int(sys.argv[2])
torch.set_num_threads(threads)
cpu_kernels.top_magnitudes(a, k, zero_dropped=True)
times = []
for _ in range(int(sys.argv[3])):
    start = time.perf_counter()
    cpu_kernels.top_magnitudes(a, k, zero_dropped=True)
    times.append(time.perf_counter() - start)
median, least = sorted(times)[len(times) // 2], min(times)
print(dtype, threads, "median ms", round(median * 1e3, 3), "min ms", round(least * 1e3, 3))

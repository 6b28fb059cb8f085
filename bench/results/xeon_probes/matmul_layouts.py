"""The dense FFN's matmul on the model's layout ([out, in], F.linear) against teal's unit-major copy ([in, out],
x @ W), the median of 7 calls, at 1-128 tokens: what `masked` and `dense` pay for the unit-major storage.
Run from the repository root: python bench/results/xeon_probes/matmul_layouts.py"""
import time

import torch
import torch.nn.functional as F


def median_ms(fn, n=7):
    fn(), fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


for h, f in ((576, 1536), (4096, 11008)):
    for dt in (torch.bfloat16, torch.float32):
        w = torch.randn(f, h, dtype=dt)
        wu = w.t().contiguous()
        for n in (1, 8, 32, 128):
            x = torch.randn(n, h, dtype=dt)
            print(f"{h}x{f} {str(dt)[6:]} {n:>3} tokens: model layout {median_ms(lambda: F.linear(x, w)):.3f} ms, "
                  f"unit-major {median_ms(lambda: x @ wu):.3f} ms")

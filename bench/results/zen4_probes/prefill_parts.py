"""Probe (2026-12-03 session): the parts of teal's `masked` path at a prefill's 2048 tokens (top-k zeroing of the
inputs, the gate|up product on the unit-major weights, the activation in torch or compiled, the zeroing of the
activations, the down product) beside the dense FFN, medians of 5 calls, in cache.

    PYTHONPATH=. python bench/results/zen4_probes/prefill_parts.py     # output: output_prefill_parts.txt
"""

import time

import torch
import torch.nn.functional as F

from bricks.routing import cpu_kernels

torch.manual_seed(0)


def median_ms(fn, n=5):
    fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


for hidden, d in ((576, 1536), (4096, 11008)):
    for dt in (torch.bfloat16, torch.float32):
        x = torch.randn(2048, hidden).to(dt)
        w_in_t = (torch.randn(hidden, 2 * d) / hidden**0.5).to(dt)
        w_down_t = (torch.randn(d, hidden) / d**0.5).to(dt)
        w_gate, w_up, w_down = w_in_t[:, :d].t().contiguous(), w_in_t[:, d:].t().contiguous(), w_down_t.t().contiguous()
        n_in, n_act = int(0.6 * hidden), int(0.3 * d)
        h = x @ w_in_t
        a = F.silu(h[:, :d]) * h[:, d:]
        r = {"dense": median_ms(lambda: F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)),
             "zero_x": median_ms(lambda: cpu_kernels.top_magnitudes(x, n_in, zero_dropped=True)),
             "mm_in": median_ms(lambda: x @ w_in_t),
             "act_torch": median_ms(lambda: F.silu(h[:, :d]) * h[:, d:]),
             "act_compiled": median_ms(lambda: cpu_kernels.gated_silu(h, d)),
             "zero_a": median_ms(lambda: cpu_kernels.top_magnitudes(a, n_act, zero_dropped=True)),
             "mm_down": median_ms(lambda: a @ w_down_t)}
        parts = sum(v for k, v in r.items() if k not in ("dense", "act_compiled"))
        print(hidden, d, dt, {k: round(v, 2) for k, v in r.items()}, "parts", round(parts, 2), flush=True)

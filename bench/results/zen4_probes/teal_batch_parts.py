"""Probe: where a bf16 batch's time goes in teal's CPU kernel, beside torch's dense products (output beside it).

    python bench/results/zen4_probes/teal_batch_parts.py HIDDEN D_FF TOKENS

One call per copy of the FFN (as many copies as hold 128 MB of weights, as bench_ffn.py does), in turns of 8 calls
of each variant, 30 turns; medians. Compute 0.5 keeps 0.6 of the inputs and 0.3 of the neurons per token
(`SparseFFN`); `keep_act` 1 leaves the kernel's gate|up and its selection, `keep_in` 1 its down projection.
"""

import sys
import time

import torch
import torch.nn.functional as F

from bricks.routing import cpu_kernels

torch.manual_seed(0)
hidden, d_ff, tokens = (int(v) for v in sys.argv[1:4])
dtype = torch.bfloat16
copies = max(1, (128 << 20) // (3 * hidden * d_ff * 2))
weights = [(torch.randn(2 * d_ff, hidden, dtype=dtype) / hidden**0.5, torch.randn(hidden, d_ff, dtype=dtype) / d_ff**0.5)
           for _ in range(copies)]
unit_major = [(w.t().contiguous(), d.t().contiguous()) for w, d in weights]
xs = [torch.randn(tokens, hidden, dtype=dtype) for _ in range(16)]
counts = torch.zeros(5, dtype=torch.int64)
keep_in, keep_act = int(0.6 * hidden), int(0.3 * d_ff)


def dense(i):
    w, d = weights[i % copies]
    g, u = F.linear(xs[i % 16], w).chunk(2, -1)
    return F.linear(F.silu(g) * u, d)


def dense_gate_up(i):
    return F.linear(xs[i % 16], weights[i % copies][0])


def dense_down(i):
    return F.linear(xs[i % 16].repeat(1, d_ff // hidden + 1)[:, :d_ff], weights[i % copies][1])


def kernel(i, k_in=keep_in, k_act=keep_act):
    w, d = unit_major[i % copies]
    return cpu_kernels.teal_ffn(xs[i % 16], w, d, k_in, k_act, None, None, counts, True)


variants = {"dense FFN": dense, "dense gate|up": dense_gate_up, "dense down": dense_down, "kernel": kernel,
            "kernel, keep_act 1": lambda i: kernel(i, k_act=1), "kernel, keep_in 1": lambda i: kernel(i, k_in=1),
            "kernel, both 1": lambda i: kernel(i, 1, 1)}
times = {name: [] for name in variants}
with torch.no_grad():
    for turn in range(30):
        for name, f in variants.items():
            for j in range(8):
                t = time.perf_counter()
                f(turn * 8 + j)
                if j:
                    times[name].append(time.perf_counter() - t)
print(f"{hidden}x{d_ff}, {tokens} bf16 tokens, {copies} copies, keep_in {keep_in}, keep_act {keep_act}")
for name, v in times.items():
    v.sort()
    print(f"{name:>20}: median {1e3 * v[len(v) // 2]:.3f} ms")

"""Times the brick kernel's call (`cpu_kernels.brick_ffn`) against dense torch matmuls, bf16, out of cache: random
weights in 64 bricks, each token 32 of them at random, copies of the FFN cycled so that its weights come from memory.

    python bench/results/xeon_probes/brick_call.py HIDDEN D_FF TOKENS ACTIVE [dense|kernel|both] [CALLS]
"""

import sys
import time

import torch
import torch.nn.functional as F

from bricks.routing import cpu_kernels

hidden, d_ff, tokens, active = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
which = sys.argv[5] if len(sys.argv) > 5 else "both"
calls = int(sys.argv[6]) if len(sys.argv) > 6 else 200
n_bricks = 64
size = d_ff // n_bricks
copies = max(1, int(400e6 // (3 * hidden * d_ff * 2)))
g = torch.Generator().manual_seed(0)
w_in = [torch.randn(n_bricks, 2 * size, hidden, generator=g).bfloat16() * 0.02 for _ in range(copies)]
w_down = [torch.randn(n_bricks, size, hidden, generator=g).bfloat16() * 0.02 for _ in range(copies)]
gate_up = [w.reshape(-1, hidden) for w in w_in]
down = [w.reshape(-1, hidden).t().contiguous() for w in w_down]
x = torch.randn(tokens, hidden, generator=g).bfloat16()
k = int(active * n_bricks)
sel = torch.zeros(tokens, n_bricks, dtype=torch.bool)
for t in range(tokens):
    sel[t, torch.randperm(n_bricks, generator=g)[:k]] = True


def dense(i):
    h = F.linear(x, gate_up[i])
    return F.linear(F.silu(h[:, :d_ff]) * h[:, d_ff:], down[i])


def kernel(i):
    return cpu_kernels.brick_ffn(x, w_in[i], w_down[i], sel)


for name, f in (("dense", dense), ("kernel", kernel)):
    if which not in ("both", name):
        continue
    f(0)
    times = []
    for r in range(calls):
        t0 = time.perf_counter()
        f(r % copies)
        times.append(time.perf_counter() - t0)
    times.sort()
    print(f"{name} {hidden}x{d_ff} tokens {tokens} active {active}: median {1e3 * times[len(times) // 2]:.3f} ms "
          f"(copies {copies})")

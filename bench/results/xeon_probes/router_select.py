"""Where the small FFN's routed call goes, in cache (one copy, so that the parts are not memory-bound): the centroid
router's eager scores (torch's matmul by the centroids, then `top_k_mask`) against its one compiled call
(`cpu_kernels.linear_top_k`), the brick kernel alone, and the whole routed call against dense, median microseconds.

    python bench/results/xeon_probes/router_select.py > bench/results/xeon_probes/output_router_select.txt
"""

import time

import torch
import torch.nn.functional as F

from bricks.arch import ffns
from bricks.routing import BrickedFFN, cpu_kernels
from bricks.routing.bench import random_ffn_model


def median_us(fn, reps=2000):
    for _ in range(100):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e6 * times[len(times) // 2]


for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    f = ffns(random_ffn_model(576, 1536, dtype))[0]
    ffn = BrickedFFN(f, torch.randperm(1536) % 64, router="centroid", active=0.5)
    ffn.set_path("kernel")
    c = ffn.router.centroids
    for tokens in (1, 8, 32):
        x = torch.randn(tokens, 576).to(dtype)
        with torch.no_grad():
            sel = ffn.select(x)
            parts = {
                "torch matmul": median_us(lambda: F.linear(x, c)),
                "eager select": median_us(lambda: cpu_kernels.top_k_mask(F.linear(x, c), ffn.k_active)),
                "linear_top_k": median_us(lambda: cpu_kernels.linear_top_k(x, c, ffn.k_active)),
                "router select": median_us(lambda: ffn.select(x)),
                "kernel": median_us(lambda: ffn._kernel(x, sel)),
                "routed call": median_us(lambda: ffn(x)),
                "dense call": median_us(lambda: f.module(x)),
            }
        print(f"{str(dtype):>14} tokens {tokens:>2}: " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()))
print(f"kernel isa {cpu_kernels.isa()}, {torch.get_num_threads()} threads")

"""Probe: torch's bf16 product with the FFN's weights as the model stores them ([out, in], `F.linear`) against the
unit-major rows `SparseFFN` keeps for its kernels ([in, out], `x @ w`), which its `masked` and `dense` paths
multiply (output beside it).

    python bench/results/zen4_probes/unit_major_gemm.py HIDDEN D_FF [DTYPE, bfloat16 by default]

In bf16 both run through oneDNN (torch's bf16 matmul on a CPU with AVX-512 bf16; with `torch.backends.mkldnn`
off, a one-off check, not kept, found both far slower). Medians of 8 calls (100 for a small FFN) after 2 untimed ones; each
token count also with the unit-major product cut into column chunks of 1024, which did not help.
"""

import sys
import time

import torch
import torch.nn.functional as F


def median_ms(f, n):
    for _ in range(2):
        f()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return sorted(times)[n // 2] * 1e3


torch.manual_seed(0)
hidden, d_ff = (int(v) for v in sys.argv[1:3])
dtype = getattr(torch, sys.argv[3] if len(sys.argv) > 3 else "bfloat16")
n = 8 if hidden * d_ff > 1 << 24 else 100
gate_up = torch.randn(2 * d_ff, hidden, dtype=dtype)
down = torch.randn(hidden, d_ff, dtype=dtype)
gate_up_t, down_t = gate_up.t().contiguous(), down.t().contiguous()
for tokens in (8, 32, 128, 512):
    x = torch.randn(tokens, hidden, dtype=dtype)
    a = torch.randn(tokens, d_ff, dtype=dtype)
    model_in, unit_in = median_ms(lambda: F.linear(x, gate_up), n), median_ms(lambda: x @ gate_up_t, n)
    chunks = median_ms(lambda: torch.cat([x @ gate_up_t[:, j:j + 1024] for j in range(0, 2 * d_ff, 1024)], 1), n)
    model_down, unit_down = median_ms(lambda: F.linear(a, down), n), median_ms(lambda: a @ down_t, n)
    print(f"{hidden}x{d_ff} {str(dtype)[6:]} {tokens} tokens: gate|up model {model_in:.2f} unit-major {unit_in:.2f} "
          f"(in 1024-column chunks {chunks:.2f}) | down model {model_down:.2f} unit-major {unit_down:.2f} ms")

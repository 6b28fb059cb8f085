"""Probe: where the time of teal's `masked` path goes at a prefill's size, operation by operation, on the CPU.

`masked` runs the FFN's dense matmuls on the zeroed entries of each token's input and activations: what a
prefill's tokens and `bricks eval`'s windows run. This times each of its operations apart (median of a few calls,
the same inputs each time): the per-token top-k of the inputs and of the activations by torch's `topk` (the path
before `bb869f1`) and by the compiled `cpu_kernels.top_magnitudes` (after), the zeroing by a mask, the two
matmuls, the activation; and the dense FFN's two matmuls on the model's own layout beside them.

    python bench/masked_parts.py --json bench/results/masked_parts_zen5_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bricks.routing import cpu_kernels
from record import save


def median_ms(fn, calls: int) -> float:
    fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def torch_top(v: torch.Tensor, n: int) -> torch.Tensor:
    """SparseFFN's mask of the n largest |v| per row before `bb869f1`."""
    idx = v.abs().topk(n, dim=-1, sorted=False).indices
    return torch.zeros_like(v, dtype=torch.bool).scatter_(-1, idx, True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", action="append", default=None, help="HIDDENxD_FF (default: 576x1536 and 4096x11008)")
    p.add_argument("--dtype", action="append", default=None, help="default: float32 and bfloat16")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--compute", type=float, default=0.5, help="teal's split: 1.2x compute of the inputs kept")
    p.add_argument("--calls", type=int, default=7)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if not cpu_kernels.available():
        raise SystemExit(f"the CPU kernel is not available: {cpu_kernels.reason()}")
    rows = []
    torch.manual_seed(0)
    for shape in a.shape or ["576x1536", "4096x11008"]:
        hidden, d_ff = map(int, shape.split("x"))
        keep_in = min(1.0, 1.2 * a.compute)
        n_in, n_act = int(keep_in * hidden), int((3 * a.compute - 2 * keep_in) * d_ff)
        for dtype_name in a.dtype or ["float32", "bfloat16"]:
            dtype = getattr(torch, dtype_name)
            w_in_t = torch.randn(hidden, 2 * d_ff, dtype=dtype) / hidden ** 0.5  # SparseFFN's unit-major storage
            w_down_t = torch.randn(d_ff, hidden, dtype=dtype) / d_ff ** 0.5
            w_in, w_down = w_in_t.t().contiguous(), w_down_t.t().contiguous()  # the model's layout
            x = torch.randn(a.tokens, hidden, dtype=dtype)
            h = x @ w_in_t
            act = F.silu(h[:, :d_ff]) * h[:, d_ff:]
            mask = torch_top(act, n_act)
            ops = {
                "topk inputs (torch)": lambda: torch_top(x, n_in),
                "topk activations (torch)": lambda: torch_top(act, n_act),
                "zero activations by mask": lambda: act * mask,
                "top_magnitudes inputs, zeroed": lambda: cpu_kernels.top_magnitudes(x, n_in, zero_dropped=True),
                "top_magnitudes activations, zeroed": lambda: cpu_kernels.top_magnitudes(act, n_act, zero_dropped=True),
                "gate|up matmul (unit-major)": lambda: x @ w_in_t,
                "activation": lambda: F.silu(h[:, :d_ff]) * h[:, d_ff:],
                "down matmul (unit-major)": lambda: act @ w_down_t,
                "dense gate|up (model layout)": lambda: F.linear(x, w_in),
                "dense down (model layout)": lambda: F.linear(act, w_down),
            }
            with torch.no_grad():
                for op, fn in ops.items():
                    ms = median_ms(fn, a.calls)
                    rows.append({"hidden": hidden, "d_ff": d_ff, "dtype": dtype_name, "tokens": a.tokens, "op": op,
                                 "ms": round(ms, 3)})
                    print(f"{shape} {dtype_name} {a.tokens} tokens: {op}: {ms:.3f} ms", flush=True)
    save(a.json, {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()

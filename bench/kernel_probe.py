"""Probe: where the time of the sparse decode kernel goes on a GPU (one token, bf16, Llama-2-7B's FFN shapes).

For each projection (gate|up: 4096 -> 22016 rows; down: 11008 -> 4096): dense `F.linear`, and the package
kernel (`bricks.routing.kernels.sparse_rows`, autotuned) in each of its designs (`predicated`, `gathered`) at
several kept shares by a threshold, and with a top-k of half the rows; with `--variants`, also a stripped copy of the predicated loop at fixed tiles, with the
weight loads masked by the kept rows or not, and the column sums added atomically or stored as partial sums. A
kept share of 0 reads no weights: what remains is the kernel's fixed cost.

    PYTHONPATH=. python bench/kernel_probe.py     # on a CUDA machine; results: bench/results/kernel_probe_h200.txt
"""

import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from bricks.routing import kept_rows, kernels

TILES = ((128, 64, 1, 4), (256, 64, 1, 4), (128, 128, 1, 4), (64, 64, 4, 4), (128, 32, 8, 4), (256, 16, 8, 4),
         (512, 8, 8, 4))  # BLOCK_N, BLOCK_K, ITERS, warps


@triton.jit
def _variant(v_ptr, w_ptr, out_ptr, threshold, K, N, stride_w, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
             ITERS: tl.constexpr, MASK_W: tl.constexpr, PARTIAL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    start = pid_k * (BLOCK_K * ITERS)
    for i in tl.static_range(ITERS):
        rows = start + i * BLOCK_K + tl.arange(0, BLOCK_K)
        row_ok = rows < K
        v = tl.load(v_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        load = (tl.abs(v) > threshold) & row_ok if MASK_W else row_ok
        w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=load[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * v[:, None]
    sums = tl.sum(acc, axis=0)
    if PARTIAL:
        tl.store(out_ptr + pid_k * N + cols, sums, mask=col_ok)
    else:
        tl.atomic_add(out_ptr + cols, sums, mask=col_ok)


def _threshold(x: torch.Tensor, keep: float) -> float:
    """The magnitude above which the `keep` share of x lies (0 and 1: none and all)."""
    if keep == 0.0:
        return 1e9
    return -1.0 if keep == 1.0 else float(x.float().abs().quantile(1 - keep))


def main(variants: bool = "--variants" in sys.argv):
    dev = "cuda"
    torch.manual_seed(0)
    for K, N in ((4096, 22016), (11008, 4096)):
        w = torch.randn(K, N, device=dev, dtype=torch.bfloat16)
        x = torch.randn(K, device=dev, dtype=torch.bfloat16)
        w_rows = w.t().contiguous()  # [N, K]: F.linear's layout
        dense = do_bench(lambda: torch.nn.functional.linear(x[None], w_rows), warmup=50, rep=200)
        print(f"K={K} N={N}: dense F.linear {dense * 1e3:.1f} us  ({w.numel() * 2 / dense / 1e9:.2f} TB/s)", flush=True)
        counts = torch.zeros(3, dtype=torch.int64, device=dev)
        for design, tuner in zip(kernels.DESIGNS, (kernels._tuned, kept_rows._listed_rows_tuned)):
            # The tiles are tuned at the first call of a shape: at a typical share, not at the first one timed.
            kernels.sparse_rows(x, w, counts, 1, threshold=_threshold(x, 0.5), design=design)
            for keep in (0.0, 0.25, 0.5, 1.0):
                t = _threshold(x, keep)
                ms = do_bench(lambda: kernels.sparse_rows(x, w, counts, 1, threshold=t, design=design), warmup=50,
                              rep=200)
                print(f"  {design} keep {keep:.2f}: {ms * 1e3:.1f} us  best={getattr(tuner, 'best_config', None)}", flush=True)
            # Per-token top-k instead of a threshold: the selection's own kernels (predicated: torch's topk and a
            # mask; gathered: one listing program) on top of the product.
            ms = do_bench(lambda: kernels.sparse_rows(x, w, counts, 1, top=K // 2, design=design), warmup=50, rep=200)
            print(f"  {design} top-k of half: {ms * 1e3:.1f} us", flush=True)
        if not variants:
            continue
        for bn, bk, iters, warps in TILES:
            splits = triton.cdiv(K, bk * iters)
            for keep in (0.0, 0.5, 1.0):
                t = _threshold(x, keep)
                res = []
                for mask_w, partial in ((True, False), (False, False), (True, True)):
                    out = torch.zeros(splits if partial else 1, N, device=dev, dtype=torch.float32)

                    def run():
                        _variant[(triton.cdiv(N, bn), splits)](x, w, out, t, K, N, w.stride(0), BLOCK_K=bk, BLOCK_N=bn,
                                                              ITERS=iters, MASK_W=mask_w, PARTIAL=partial,
                                                              num_warps=warps)
                    res.append(do_bench(run, warmup=20, rep=100) * 1e3)
                print(f"  var bn{bn} bk{bk} it{iters} keep {keep:.1f}: masked+atomic {res[0]:.1f}  "
                      f"unmasked+atomic {res[1]:.1f}  masked+partial {res[2]:.1f} us", flush=True)


if __name__ == "__main__":
    main()

"""GPU kernels for sparse decoding: a matrix-vector product that reads only the weight rows of kept inputs (TEAL).

Batch-1 decoding on a GPU is bound by the bytes of weights read, so an
activation-sparse FFN is faster only if the skipped weights are never loaded.
With unit-major storage (`SparseFFN`: row c of `w_t` is what input c feeds
into every output), the product `y = sum over kept c of v[c] * w_t[c]` skips
whole rows. The kernel below loads a block of inputs, decides which are kept,
and issues the weight loads of the kept rows only (a predicated-off load
fetches nothing from memory). It splits the rows over many programs
(split-K), each loading a few tiles at once, so that enough loads are in
flight to fill the memory bandwidth; it accumulates in fp32 and adds each
program's column sums atomically into an fp32 output. Tile shapes are tuned
per weight shape at first use (`CONFIGS`).

Measured on an H200 (`bench/README.md`), this is not yet the win TEAL
reports: a projection costs tens of microseconds even when it reads no
weights (scheduling many short programs), so the FFN is barely faster than
dense at compute 0.5. The longer-running tiles in `CONFIGS` address that and
have not been measured yet.

Kept inputs are chosen either by a calibrated magnitude (`threshold`, TEAL's
choice: a comparison inside the kernel, nothing else launched) or by a mask
(`keep`, for per-token top-k: the top-k itself runs before the kernel, as
torch ops). For a gated FFN's down projection the kernel also computes the
activation `silu(gate) * up` from the fp32 gate/up outputs as it loads them,
so the activations are never written out. Each call counts the rows it read
(and, for the gate/up call, the token) into a device buffer: the executed
fraction stays honest without a host sync, also under CUDA-graph replay.

Runs on CUDA, and on CPU under `TRITON_INTERPRET=1` (the correctness tests).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional: the CPU paths need none
    triton = tl = None

# Tile shapes tried by the autotuner, per weight shape and dtype: (BLOCK_N, BLOCK_K, ITERS, LOOPS, warps). A program
# runs LOOPS times (a loop) over ITERS tiles of BLOCK_K rows x BLOCK_N columns (unrolled: their loads are in flight
# together) and adds its column sums atomically. On an H200 short programs cost more to schedule than their
# loads take (`bench/results/kernel_probe_h200.txt`: a projection that reads no weights at all still takes tens of
# microseconds, by tile), so some configurations make each program longer. The first five were measured there.
CONFIGS = [(64, 64, 4, 1, 4), (128, 32, 8, 1, 4), (512, 8, 8, 1, 4), (128, 128, 1, 1, 4), (128, 32, 4, 1, 4),
           (64, 64, 4, 4, 4), (64, 64, 4, 16, 4), (128, 32, 8, 4, 4), (64, 128, 2, 8, 4), (128, 64, 4, 4, 8),
           (32, 128, 4, 4, 4), (256, 32, 4, 4, 8)]
# The interpreter's tile: it runs each program in Python, so few and large ones.
INTERPRETED = {"BLOCK_N": 128, "BLOCK_K": 32, "ITERS": 2, "LOOPS": 2}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the sparse kernel can run on `device`: CUDA with triton, or any device under TRITON_INTERPRET=1."""
    return triton is not None and (torch.device(device).type == "cuda" or interpreting())


if triton is not None:

    @triton.jit
    def _sparse_rows(v_ptr, w_ptr, out_ptr, keep_ptr, counts_ptr, threshold, K, N, stride_w,
                     USE_KEEP: tl.constexpr, SILU_GATED: tl.constexpr, COUNT_SLOT: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, ITERS: tl.constexpr, LOOPS: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        # Partial sums stay per row until the end: one reduction per program, not one per tile.
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        kept_rows = tl.zeros((BLOCK_K,), dtype=tl.int32)
        start = pid_k * (BLOCK_K * ITERS * LOOPS)
        for j in range(LOOPS):
            for i in tl.static_range(ITERS):
                rows = start + (j * ITERS + i) * BLOCK_K + tl.arange(0, BLOCK_K)
                row_ok = rows < K
                if SILU_GATED:  # v holds [gate | up] pre-activations (fp32): the input is silu(gate) * up
                    g = tl.load(v_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
                    u = tl.load(v_ptr + K + rows, mask=row_ok, other=0.0).to(tl.float32)
                    v = g * tl.sigmoid(g) * u
                else:
                    v = tl.load(v_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
                if USE_KEEP:
                    kept = (tl.load(keep_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
                else:
                    kept = (tl.abs(v) > threshold) & row_ok
                # Loads of rows not kept are predicated off: those weights are never read from memory.
                w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=kept[:, None] & col_ok[None, :],
                            other=0.0)
                acc += w.to(tl.float32) * v[:, None]
                kept_rows += kept.to(tl.int32)
        tl.atomic_add(out_ptr + cols, tl.sum(acc, axis=0), mask=col_ok)
        if pid_n == 0:  # one column block counts the rows read, for the executed fraction
            tl.atomic_add(counts_ptr + COUNT_SLOT, tl.sum(kept_rows).to(tl.int64))
            if COUNT_SLOT == 1:
                if pid_k == 0:
                    tl.atomic_add(counts_ptr, 1)  # the token

    # Tuned once per (shape, dtype, selection) at first use; outputs are zeroed and counts restored between tries.
    _tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k, "ITERS": i, "LOOPS": loops}, num_warps=w)
                 for n, k, i, loops, w in CONFIGS],
        key=["K", "N", "USE_KEEP", "SILU_GATED"], reset_to_zero=["out_ptr"], restore_value=["counts_ptr"])(_sparse_rows)


def sparse_rows(v: torch.Tensor, w_t: torch.Tensor, counts: torch.Tensor, slot: int, *, threshold: float | None = None,
                keep: torch.Tensor | None = None, silu_gated: bool = False) -> torch.Tensor:
    """`sum over kept c of v[c] * w_t[c]` for one token, reading only the kept rows of `w_t` `[K, N]`; fp32 `[N]`.

    Args:
        v: the token's inputs `[K]` (or `[2K]` gate|up pre-activations when `silu_gated`).
        counts: int64 device buffer; `counts[slot]` += rows read, and `counts[0]` += 1 (the token) when slot == 1.
        threshold: keep inputs with |v| above it (TEAL's selection), or
        keep: a bool mask `[K]` of the inputs to keep (a top-k chosen beforehand).
    """
    if (threshold is None) == (keep is None):
        raise ValueError("give one of threshold and keep")
    K, N = w_t.shape
    if w_t.stride(1) != 1 or v.shape[-1] != (2 * K if silu_gated else K):
        raise ValueError(f"sparse_rows: inputs {tuple(v.shape)} do not match rows of {tuple(w_t.shape)}")
    out = torch.zeros(N, device=w_t.device, dtype=torch.float32)
    args = (v.contiguous(), w_t, out, keep if keep is not None else counts,  # an unused pointer under a threshold
            counts, 0.0 if threshold is None else float(threshold), K, N, w_t.stride(0))
    flags = dict(USE_KEEP=keep is not None, SILU_GATED=silu_gated, COUNT_SLOT=slot)
    if interpreting():
        _sparse_rows[_grid(K, N, INTERPRETED)](*args, **flags, **INTERPRETED)
    else:
        _tuned[lambda meta: _grid(K, N, meta)](*args, **flags)
    return out


def _grid(K: int, N: int, meta: dict) -> tuple[int, int]:
    return triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"] * meta["ITERS"] * meta["LOOPS"])

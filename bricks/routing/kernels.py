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
weights, so the FFN is barely faster than dense at compute 0.5. Part of
that is scheduling many short programs, which the longer-running tiles in
`CONFIGS` address; the rest is that a dropped row still costs its
instructions in the compiled loop (addresses, predicates, conversions,
products on 0: `bench/kernel_sass.py` counts them), and on a GPU with this
much memory bandwidth the instructions of every row take about as long as
the kept rows' loads. A second design, `gathered`, first lists each chunk's
kept rows (their indices and values, one small kernel), then loops over
the listed rows alone: a dropped row costs nothing but its place in the
listing. Which of the two runs is timed at a shape's first call on the GPU
(`sparse_rows`); neither change has been measured on a GPU yet.

Kept inputs are chosen by a calibrated magnitude (`threshold`, TEAL's
choice: a comparison inside the kernel, nothing else launched), by a mask
(`keep`), or as each token's top-k (`top`): in the gathered design one
listing program selects them (`bricks.routing.kept_rows`), in the
predicated one torch's `topk` makes the mask first. For a gated FFN's down
projection the kernels also compute the activation `silu(gate) * up` from
the fp32 gate/up outputs as they load them, so the activations are never
written out. Each call counts the rows it read
(and, for the gate/up call, the token) into a device buffer: the executed
fraction stays honest without a host sync, also under CUDA-graph replay.

A decode token of a bricked FFN (`BrickedFFN`, the router's k bricks) takes
`brick_rows`: the selected bricks' gate|up rows as dot products with the
token (a block of one brick's rows per program, read in place where
gathering the bricks would copy them), then their down rows summed with the
activations, computed inside from the fp32 gate|up values. Its tiles are
autotuned like the above and have not been measured on a GPU yet.

Runs on CUDA, and on CPU under `TRITON_INTERPRET=1` (the correctness tests).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .kept_rows import gathered_rows

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

# The two designs of the sparse product (`sparse_rows`): `predicated` (one kernel, every row's instructions, the kept
# rows' loads only) and `gathered` (the kept rows listed first, then a loop over them alone).
DESIGNS = ("predicated", "gathered")


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
                keep: torch.Tensor | None = None, top: int | None = None, silu_gated: bool = False,
                design: str | None = None) -> torch.Tensor:
    """`sum over kept c of v[c] * w_t[c]` for one token, reading only the kept rows of `w_t` `[K, N]`; fp32 `[N]`.

    Args:
        v: the token's inputs `[K]` (or `[2K]` gate|up pre-activations when `silu_gated`: the inputs are then the
            activations `silu(gate) * up`, computed in fp32 inside).
        counts: int64 device buffer; `counts[slot]` += rows read, and `counts[0]` += 1 (the token) when slot == 1.
        threshold: keep inputs with |v| above it (TEAL's selection), or
        keep: a bool mask `[K]` of the inputs to keep, or
        top: keep the `top` inputs of largest |v| (ties in index order in the gathered design).
        design: `"predicated"` or `"gathered"` (see `DESIGNS`); by default the faster of the two for this
            shape, timed at its first call on a GPU (`gathered` under the interpreter), or `BRICKS_TRITON_ROWS`.
    """
    if sum(x is not None for x in (threshold, keep, top)) != 1:
        raise ValueError("give one of threshold, keep and top")
    K, N = w_t.shape
    if w_t.stride(1) != 1 or v.shape[-1] != (2 * K if silu_gated else K):
        raise ValueError(f"sparse_rows: inputs {tuple(v.shape)} do not match rows of {tuple(w_t.shape)}")
    v = v.contiguous()
    design = design or os.environ.get("BRICKS_TRITON_ROWS") or _tuned_design(_RUNS, v, w_t, counts, slot, threshold,
                                                                               keep, top, silu_gated)
    if design not in _RUNS:
        raise ValueError(f"unknown sparse_rows design {design!r}: use one of {', '.join(DESIGNS)}")
    return _RUNS[design](v, w_t, counts, slot, threshold, keep, top, silu_gated)


def _predicated(v, w_t, counts, slot, threshold, keep, top, silu_gated):
    K, N = w_t.shape
    if top is not None:  # the mask first, from torch's top-k of the inputs' magnitudes
        inputs = F.silu(v[:K]) * v[K:] if silu_gated else v
        keep = torch.zeros(K, device=v.device, dtype=torch.bool).scatter_(0, inputs.abs().topk(min(top, K)).indices,
                                                                          True)
    out = torch.zeros(N, device=w_t.device, dtype=torch.float32)
    args = (v, w_t, out, keep if keep is not None else counts,  # an unused pointer under a threshold
            counts, 0.0 if threshold is None else float(threshold), K, N, w_t.stride(0))
    flags = dict(USE_KEEP=keep is not None, SILU_GATED=silu_gated, COUNT_SLOT=slot)
    if interpreting():
        _sparse_rows[_grid(K, N, INTERPRETED)](*args, **flags, **INTERPRETED)
    else:
        _tuned[lambda meta: _grid(K, N, meta)](*args, **flags)
    return out


def _gathered(v, w_t, counts, slot, threshold, keep, top, silu_gated):
    return gathered_rows(v, w_t, counts, slot, threshold, keep, top, silu_gated, interpreting())


_RUNS = {"predicated": _predicated, "gathered": _gathered}  # each of DESIGNS

# The design each (shape, dtype, selection) took: timed once, at its first call on a GPU (before any graph capture,
# as the tiles' autotuning is).
_designs: dict[tuple, str] = {}


def _tuned_design(runs: dict, v, w_t, counts, slot, threshold, keep, top, silu_gated) -> str:
    if interpreting():
        return "gathered"
    key = (tuple(w_t.shape), w_t.dtype, v.dtype, "threshold" if threshold is not None else
           "keep" if keep is not None else "top", silu_gated)
    if key not in _designs:
        from triton.testing import do_bench

        saved = counts.clone()  # the timing calls count rows too
        times = {}
        for name, run in runs.items():
            call = lambda run=run: run(v, w_t, counts, slot, threshold, keep, top, silu_gated)  # noqa: E731
            call()  # its tiles' autotuning first: do_bench sizes its loop from the first calls' time
            times[name] = do_bench(call, warmup=10, rep=50)
        counts.copy_(saved)
        _designs[key] = min(times, key=times.get)
    return _designs[key]


def designs_for(*weights: torch.Tensor) -> dict[str, str]:
    """The design the projections of these weights (of every weight, given none) took so far, for reports, keyed
    by weight shape, dtype and selection: `{"4096x22016 bfloat16 threshold": "gathered", ...}`."""
    of = {(tuple(w.shape), w.dtype) for w in weights}
    return {f"{k[0][0]}x{k[0][1]} {str(k[1]).removeprefix('torch.')} {k[3]}{' silu' if k[4] else ''}": d
            for k, d in _designs.items() if not of or (k[0], k[1]) in of}


if triton is not None:

    @triton.jit
    def _brick_gate_up(x_ptr, w_ptr, idx_ptr, h_ptr, HIDDEN, ROWS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """h[j, r] = w[idx[j], r] . x for BLOCK_R rows of the j-th selected brick (rows contiguous in hidden)."""
        j = tl.program_id(0)
        rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < ROWS
        brick = tl.load(idx_ptr + j).to(tl.int64)
        w_rows = w_ptr + brick * ROWS * HIDDEN + rows[:, None].to(tl.int64) * HIDDEN
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)  # reduced once, at the end
        for c0 in range(0, HIDDEN, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < HIDDEN
            xv = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += w.to(tl.float32) * xv[None, :]
        tl.store(h_ptr + j * ROWS + rows, tl.sum(acc, axis=1), mask=row_ok)

    @triton.jit
    def _brick_down(h_ptr, w_ptr, idx_ptr, out_ptr, K_SEL, SIZE, HIDDEN,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BRICKS: tl.constexpr):
        """out[cols] += sum over BRICKS selected bricks of silu(gate) * up times their down rows, the activation
        computed from the fp32 gate|up values `h` as they are loaded."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < HIDDEN
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
        for i in range(BRICKS):
            j = tl.program_id(1) * BRICKS + i
            brick = tl.load(idx_ptr + tl.minimum(j, K_SEL - 1)).to(tl.int64)
            limit = tl.where(j < K_SEL, SIZE, 0)  # past the last selected brick: no rows
            for r0 in range(0, SIZE, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                row_ok = rows < limit
                g = tl.load(h_ptr + j * 2 * SIZE + rows, mask=row_ok, other=0.0)
                u = tl.load(h_ptr + j * 2 * SIZE + SIZE + rows, mask=row_ok, other=0.0)
                a = g * tl.sigmoid(g) * u
                w = tl.load(w_ptr + brick * SIZE * HIDDEN + rows[:, None].to(tl.int64) * HIDDEN + cols[None, :],
                            mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                acc += w.to(tl.float32) * a[:, None]
        tl.atomic_add(out_ptr + cols, tl.sum(acc, axis=0), mask=col_ok)

    # Tiles tried per shape at first use, none measured yet (no GPU since they were written): gate|up (BLOCK_R,
    # BLOCK_C, warps): enough row blocks per brick to fill the GPU at batch 1; down (BLOCK_R, BLOCK_N, BRICKS,
    # warps): column blocks times groups of bricks, each group's sums added atomically.
    BRICK_IN_CONFIGS = [(16, 256, 4), (32, 128, 4), (8, 512, 4), (64, 128, 8)]
    BRICK_DOWN_CONFIGS = [(16, 128, 4, 4), (32, 128, 8, 4), (16, 256, 2, 4), (32, 64, 4, 4), (64, 128, 2, 8)]
    _brick_gate_up_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_R": r, "BLOCK_C": c}, num_warps=w) for r, c, w in BRICK_IN_CONFIGS],
        key=["HIDDEN", "ROWS"])(_brick_gate_up)
    _brick_down_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_R": r, "BLOCK_N": n, "BRICKS": b}, num_warps=w) for r, n, b, w in BRICK_DOWN_CONFIGS],
        key=["K_SEL", "SIZE", "HIDDEN"], reset_to_zero=["out_ptr"])(_brick_down)


def brick_rows(x: torch.Tensor, w_in: torch.Tensor, w_down: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """One token `[hidden]` through the bricks `idx` (`[k]` indices, on the device) of a gated SiLU FFN stored
    brick-major (`BrickedFFN`: `w_in` `[n, 2*size, hidden]`, gate rows then up rows per brick; `w_down`
    `[n, size, hidden]`): only the selected bricks' rows are read, each contiguous. fp32 `[hidden]`.

    The gate|up rows are dot products with the token (every program one block of one brick's rows, no atomics);
    the down rows are summed with the activations, which the kernel computes from the fp32 gate|up values."""
    n, rows, hidden = w_in.shape
    size = rows // 2
    if not (w_in.is_contiguous() and w_down.is_contiguous() and rows % 2 == 0 and w_down.shape == (n, size, hidden)
            and x.numel() == hidden and idx.dim() == 1):
        raise ValueError(f"brick_rows: a token of {x.numel()} values and bricks {tuple(w_in.shape)} / "
                         f"{tuple(w_down.shape)} do not match a gated FFN's brick-major storage")
    k = idx.numel()
    x, idx = x.reshape(-1).contiguous(), idx.to(torch.int32).contiguous()
    h = torch.empty(k, rows, device=w_in.device, dtype=torch.float32)
    out = torch.zeros(hidden, device=w_in.device, dtype=torch.float32)
    if interpreting():  # few, large programs (see INTERPRETED)
        _brick_gate_up[(k, triton.cdiv(rows, 64))](x, w_in, idx, h, hidden, rows, BLOCK_R=64, BLOCK_C=128)
        _brick_down[(triton.cdiv(hidden, 128), triton.cdiv(k, 4))](h, w_down, idx, out, k, size, hidden,
                                                                    BLOCK_R=64, BLOCK_N=128, BRICKS=4)
    else:
        _brick_gate_up_tuned[lambda meta: (k, triton.cdiv(rows, meta["BLOCK_R"]))](x, w_in, idx, h, hidden, rows)
        _brick_down_tuned[lambda meta: (triton.cdiv(hidden, meta["BLOCK_N"]), triton.cdiv(k, meta["BRICKS"]))](
            h, w_down, idx, out, k, size, hidden)
    return out


def _grid(K: int, N: int, meta: dict) -> tuple[int, int]:
    return triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"] * meta["ITERS"] * meta["LOOPS"])

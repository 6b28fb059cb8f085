"""The rows a token keeps on a GPU, listed for teal's gathered decode kernel or zeroed for its batches.

The `predicated` design of the decode kernel (`bricks.routing.kernels`) runs
its loop over every row of the weight and skips the loads of the dropped
ones; a dropped row still costs its instructions there. The `gathered`
design lists them first: for each chunk of CHUNK inputs, the indices and
fp32 values of the rows it keeps and their count (a prefix sum of the kept
flags gives each its place), and the product's programs loop over the listed
rows only: a dropped row costs its place in the listing. The rows are chosen
in one of three ways:

- a calibrated magnitude (`threshold`, TEAL's selection): one program per
  chunk;
- a mask chosen beforehand (`keep`);
- the k largest magnitudes (`top`, per-token top-k) in one program over the
  whole vector: the k-th largest magnitude a byte of its bits at a time
  (four histograms of the candidates), and the ties at it kept in index
  order, as the CPU kernel keeps them. torch's `topk` and the mask built
  from it took several kernels per projection where this is one.

Several tokens (the `masked` path: dense matmuls on zeroed entries) take
`zero_dropped`: each token's inputs with the dropped ones zeroed, in one
kernel (a program per token) where torch took a few per projection (the
magnitudes, the selection, the zeroing, the count), which at a batch's
matmul sizes cost a GPU more than their arithmetic.

Both also compute a gated FFN's activations `silu(gate) * up` from its
gate|up values, and add the rows kept to `counts[slot]` (and the token to
`counts[0]` for slot 1) on the device: no host sync, also under CUDA graphs.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional, as in `kernels`
    triton = tl = None

# Rows per list of kept rows: one program of the threshold or mask listing each.
CHUNK = 128
# Tiles of the product: (BLOCK_N, BLOCK_K, CHUNKS, warps). A program sums CHUNKS lists' rows, BLOCK_K at a time,
# over BLOCK_N columns; none measured on a GPU yet.
CONFIGS = [(128, 32, 1, 4), (128, 32, 4, 4), (256, 16, 2, 4), (64, 64, 2, 4), (128, 64, 2, 8), (512, 8, 4, 4),
           (256, 32, 4, 8), (64, 32, 8, 4), (256, 32, 2, 4), (128, 64, 2, 4)]
# The interpreter's tile: it runs each program in Python, so few and large ones.
INTERPRETED = {"BLOCK_N": 128, "BLOCK_K": 32, "CHUNKS": 2}


# Warps of the one program that chooses a top-k, by chunks of the vector (its values stay in registers through the
# four counts): fewer values a thread on long vectors (11008 inputs, padded to 16384: 16 warps, 32 a thread), fewer
# barriers on short ones.
def top_k_warps(chunks: int) -> int:
    return 16 if chunks > 32 else 8


if triton is not None:

    @triton.jit
    def _inputs(v_ptr, rows, row_ok, K, SILU_GATED: tl.constexpr):
        """fp32 inputs at `rows`: v's, or the activations silu(gate) * up of fp32 [gate | up] pre-activations."""
        if SILU_GATED:
            g = tl.load(v_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            u = tl.load(v_ptr + K + rows, mask=row_ok, other=0.0).to(tl.float32)
            return g * tl.sigmoid(g) * u
        return tl.load(v_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)

    @triton.jit
    def _count(counts_ptr, n, first, COUNT_SLOT: tl.constexpr):
        tl.atomic_add(counts_ptr + COUNT_SLOT, n.to(tl.int64))
        if COUNT_SLOT == 1:
            if first:
                tl.atomic_add(counts_ptr, 1)  # the token

    @triton.jit
    def _top_k(v, row_ok, KEEP, SIZE: tl.constexpr):
        """The KEEP largest |v| of a vector held as [chunks, CHUNK] (row-major order), NaN as infinity and ties
        at the k-th kept in index order, as a mask."""
        m = tl.abs(v)
        m = tl.where(m == m, m, float("inf"))  # NaN ranks as infinity, as on the CPU
        # A non-negative float orders as its bits do (padding: -1, below every value). The k-th largest key t, a
        # byte at a time from the top (a radix select): count the candidates' next byte in 256 bins (the others
        # in a spare bin), keep the largest byte under which at least `left` of them lie.
        key = tl.where(row_ok, m.to(tl.int32, bitcast=True), -1)
        bins = tl.arange(0, 512)
        t = tl.zeros((), dtype=tl.int32)
        left = KEEP  # of the candidates, how many are still to keep
        for shift in tl.static_range(24, -8, -8):
            if shift == 24:
                high = key >= 0
            else:
                high = (key >> (shift + 8)) == (t >> (shift + 8))  # the bytes above this one are t's
            digit = tl.where(high, (key >> shift) & 255, 256)
            count = tl.histogram(tl.reshape(digit, (SIZE,)), 512)
            count = tl.where(bins < 256, count, 0)
            at_least = tl.sum(count, axis=0) - tl.cumsum(count, axis=0) + count  # candidates with a byte >= each
            byte = tl.max(tl.where((at_least >= left) & (bins < 256), bins, -1), axis=0)
            left -= tl.sum(tl.where(bins == byte, at_least - count, 0), axis=0)  # those above it are all kept
            t = t | (byte << shift)
        tied = (key == t).to(tl.int32)
        # The `left` ties at t kept in index order: a tie's rank counts the ties of earlier chunks and of its own.
        tied_per_chunk = tl.sum(tied, axis=1)
        rank = tl.cumsum(tied, axis=1) + (tl.cumsum(tied_per_chunk, axis=0) - tied_per_chunk)[:, None]
        kept = (key > t) | ((tied != 0) & (rank <= left))
        return kept

    @triton.jit
    def _list_kept(v_ptr, keep_ptr, counts_ptr, idx_ptr, val_ptr, n_ptr, threshold, K,
                   USE_KEEP: tl.constexpr, SILU_GATED: tl.constexpr, COUNT_SLOT: tl.constexpr, CHUNK: tl.constexpr):
        """The kept rows of one chunk of CHUNK inputs (above `threshold`, or in the mask `keep`), listed at the
        chunk's start: their indices (`idx`), fp32 values (`val`) and count (`n`)."""
        chunk = tl.program_id(0)
        rows = chunk * CHUNK + tl.arange(0, CHUNK)
        row_ok = rows < K
        v = _inputs(v_ptr, rows, row_ok, K, SILU_GATED)
        if USE_KEEP:
            kept = (tl.load(keep_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
        else:
            kept = (tl.abs(v) > threshold) & row_ok
        at = chunk * CHUNK + tl.cumsum(kept.to(tl.int32), 0) - 1  # a kept row's place in its chunk's list
        tl.store(idx_ptr + at, rows, mask=kept)
        tl.store(val_ptr + at, v, mask=kept)
        n = tl.sum(kept.to(tl.int32))
        tl.store(n_ptr + chunk, n)
        _count(counts_ptr, n, chunk == 0, COUNT_SLOT)

    @triton.jit
    def _list_top_k(v_ptr, counts_ptr, idx_ptr, val_ptr, n_ptr, K, KEEP, N_CHUNKS,
                    SILU_GATED: tl.constexpr, COUNT_SLOT: tl.constexpr, CHUNK: tl.constexpr, CHUNKS_P2: tl.constexpr):
        """The KEEP inputs of largest magnitude, listed per chunk as `_list_kept` lists them; one program, the
        vector held as [CHUNKS_P2, CHUNK] (a chunk a row)."""
        chunks = tl.arange(0, CHUNKS_P2)
        rows = chunks[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
        row_ok = rows < K
        v = _inputs(v_ptr, rows, row_ok, K, SILU_GATED)
        kept = _top_k(v, row_ok, KEEP, CHUNKS_P2 * CHUNK)
        at = rows - tl.arange(0, CHUNK)[None, :] + tl.cumsum(kept.to(tl.int32), axis=1) - 1
        tl.store(idx_ptr + at, rows, mask=kept)
        tl.store(val_ptr + at, v, mask=kept)
        n = tl.sum(kept.to(tl.int32), axis=1)
        tl.store(n_ptr + chunks, n, mask=chunks < N_CHUNKS)
        _count(counts_ptr, tl.sum(n, axis=0), True, COUNT_SLOT)

    @triton.jit
    def _zero_dropped(v_ptr, out_ptr, counts_ptr, threshold, K, KEEP, stride_v, stride_out, USE_TOP: tl.constexpr,
                      SILU_GATED: tl.constexpr, COUNT_SLOT: tl.constexpr, CHUNK: tl.constexpr,
                      CHUNKS_P2: tl.constexpr):
        """One token's inputs (a program each) with the dropped ones zeroed, in out's dtype. Counted: the rows kept,
        and beside them the rows the dense matmul multiplies by 0 (`counts[COUNT_SLOT + 2]`)."""
        token = tl.program_id(0)
        rows = tl.arange(0, CHUNKS_P2)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
        row_ok = rows < K
        v = _inputs(v_ptr + token.to(tl.int64) * stride_v, rows, row_ok, K, SILU_GATED)
        if USE_TOP:
            kept = _top_k(v, row_ok, KEEP, CHUNKS_P2 * CHUNK)
        else:
            kept = (tl.abs(v) > threshold) & row_ok
        tl.store(out_ptr + token.to(tl.int64) * stride_out + rows, tl.where(kept, v, 0.0).to(out_ptr.dtype.element_ty),
                 mask=row_ok)
        n = tl.sum(tl.sum(kept.to(tl.int32), axis=1), axis=0)
        _count(counts_ptr, n, True, COUNT_SLOT)
        tl.atomic_add(counts_ptr + COUNT_SLOT + 2, (K - n).to(tl.int64))

    @triton.jit
    def _listed_rows(idx_ptr, val_ptr, n_ptr, w_ptr, out_ptr, N, stride_w, N_CHUNKS,
                     CHUNK: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
        """out[cols] += the listed rows of w times their values, for CHUNKS chunks' lists."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)  # reduced once, at the end
        for c in range(CHUNKS):
            chunk = tl.program_id(1) * CHUNKS + c
            n = tl.load(n_ptr + chunk, mask=chunk < N_CHUNKS, other=0)
            for r0 in range(0, n, BLOCK_K):
                r = r0 + tl.arange(0, BLOCK_K)
                ok = r < n
                rows = tl.load(idx_ptr + chunk * CHUNK + r, mask=ok, other=0)
                v = tl.load(val_ptr + chunk * CHUNK + r, mask=ok, other=0.0)
                w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + cols[None, :],
                            mask=ok[:, None] & col_ok[None, :], other=0.0)
                acc += w.to(tl.float32) * v[:, None]
        tl.atomic_add(out_ptr + cols, tl.sum(acc, axis=0), mask=col_ok)

    _listed_rows_tuned = triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k, "CHUNKS": c}, num_warps=w) for n, k, c, w in CONFIGS],
        key=["N", "N_CHUNKS"], reset_to_zero=["out_ptr"])(_listed_rows)


def kept_lists(v: torch.Tensor, K: int, counts: torch.Tensor, slot: int, threshold: float | None,
               keep: torch.Tensor | None, top: int | None, silu_gated: bool):
    """Each chunk's kept rows: indices and fp32 values (chunk c's at c * CHUNK on), and how many (`[chunks]`)."""
    n_chunks = triton.cdiv(K, CHUNK)
    idx = torch.empty(n_chunks * CHUNK, device=v.device, dtype=torch.int32)
    val = torch.empty(n_chunks * CHUNK, device=v.device, dtype=torch.float32)
    n = torch.empty(n_chunks, device=v.device, dtype=torch.int32)
    flags = dict(SILU_GATED=silu_gated, COUNT_SLOT=slot, CHUNK=CHUNK)
    if top is not None:
        _list_top_k[(1,)](v, counts, idx, val, n, K, min(top, K), n_chunks, **flags,
                          CHUNKS_P2=triton.next_power_of_2(n_chunks), num_warps=top_k_warps(n_chunks))
    else:
        _list_kept[(n_chunks,)](v, keep if keep is not None else counts, counts, idx, val, n,
                                0.0 if threshold is None else float(threshold), K, USE_KEEP=keep is not None, **flags)
    return idx, val, n


def gathered_rows(v: torch.Tensor, w_t: torch.Tensor, counts: torch.Tensor, slot: int, threshold: float | None,
                  keep: torch.Tensor | None, top: int | None, silu_gated: bool, interpreted: bool) -> torch.Tensor:
    """`kernels.sparse_rows` in this design: exactly one of `threshold`, `keep` and `top` chooses the rows."""
    K, N = w_t.shape
    idx, val, n = kept_lists(v, K, counts, slot, threshold, keep, top, silu_gated)
    n_chunks = n.numel()
    out = torch.zeros(N, device=w_t.device, dtype=torch.float32)
    args = (idx, val, n, w_t, out, N, w_t.stride(0), n_chunks)
    if interpreted:
        _listed_rows[(triton.cdiv(N, INTERPRETED["BLOCK_N"]), triton.cdiv(n_chunks, INTERPRETED["CHUNKS"]))](
            *args, CHUNK=CHUNK, **INTERPRETED)
    else:
        _listed_rows_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(n_chunks, meta["CHUNKS"]))](
            *args, CHUNK=CHUNK)
    return out


def zero_dropped(v: torch.Tensor, K: int, counts: torch.Tensor, slot: int, *, threshold: float | None = None,
                 top: int | None = None, silu_gated: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Each token's inputs `[tokens, K]` (of `v` `[tokens, K]`, or its activations when `silu_gated`: `v` `[tokens,
    2K]` gate|up values) with all but its kept ones zeroed, kept above `threshold` or its `top` largest; in `dtype`
    (v's by default). `counts[slot]` gains the rows kept, `counts[slot + 2]` the rows zeroed (a dense matmul
    multiplies them by 0), `counts[0]` the tokens when slot == 1."""
    if (threshold is None) == (top is None):
        raise ValueError("give one of threshold and top")
    if v.dim() != 2 or v.shape[1] != (2 * K if silu_gated else K) or v.stride(1) != 1:
        raise ValueError(f"zero_dropped: inputs {tuple(v.shape)} are not rows of {K} inputs")
    out = torch.empty(v.shape[0], K, device=v.device, dtype=dtype or v.dtype)
    n_chunks = triton.cdiv(K, CHUNK)
    _zero_dropped[(v.shape[0],)](v, out, counts, 0.0 if threshold is None else float(threshold), K,
                                 min(top or K, K), v.stride(0), out.stride(0), USE_TOP=top is not None,
                                 SILU_GATED=silu_gated, COUNT_SLOT=slot, CHUNK=CHUNK,
                                 CHUNKS_P2=triton.next_power_of_2(n_chunks), num_warps=top_k_warps(n_chunks))
    return out

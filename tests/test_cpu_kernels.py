"""The compiled CPU kernel (`bricks.routing.cpu_kernels`): the routed function of one or many tokens, counted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bricks
from bricks.arch import ffns
from bricks.routing import SparseFFN, cpu_kernels
from bricks.routing.bench import random_ffn_model
from bricks.routing.cpu_kernels import KERNEL_MAX_TOKENS

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=f"no CPU kernel here: {cpu_kernels.reason()}")


def _sparse(hidden=40, d_ff=52, dtype=torch.float32, compute=0.5, selection="topk"):
    torch.manual_seed(0)
    f = ffns(random_ffn_model(hidden, d_ff, dtype))[0]
    sparse = SparseFFN(f, compute, selection=selection)
    if selection == "threshold":
        sparse.fit_thresholds(torch.randn(2000, hidden).to(dtype))
    return sparse


@pytest.mark.parametrize("selection", ["topk", "threshold"])
@pytest.mark.parametrize("compute", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("hidden, d_ff", [(40, 52), (80, 200)])
def test_kernel_computes_the_bags_function_and_counts_what_it_read(selection, compute, hidden, d_ff):
    # Odd sizes: the columns do not split evenly over threads, tiles or vectors (40 and 104 columns end with
    # 8 that are not a whole vector; 80 and 400 with 5 and 1 whole vectors after the full chunks).
    sparse = _sparse(hidden=hidden, d_ff=d_ff, compute=compute, selection=selection)
    assert "kernel" in sparse.paths
    with torch.no_grad():
        # One token (a decode step) five times, then several in one call: rows several of them keep are read once.
        for tokens in (1, 1, 1, 1, 1, 2, 3, 8, 33, 100):
            x = torch.randn(tokens, hidden)
            sparse.set_path("bags")
            sparse.reset_counts()
            ref = sparse(x)
            bags = sparse.executed_fraction()
            sparse.set_path("kernel")
            sparse.reset_counts()
            torch.testing.assert_close(sparse(x), ref, rtol=1e-5, atol=1e-6)
            # The same rows read: every input and neuron the bags read, no more (per token under thresholds),
            # counted per token when several tokens share a row.
            assert sparse.executed_fraction() == pytest.approx(bags) and sparse.routed_fraction() == pytest.approx(bags)
            # At full compute the module runs the dense FFN on every path; the kernel itself keeps every row.
            if sparse.full:
                torch.testing.assert_close(sparse._kernel(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 32])
def test_kernel_threads_split_columns_so_results_are_bit_identical(tokens, dtype):
    sparse = _sparse(hidden=576, d_ff=1536, dtype=dtype)
    sparse.set_path("kernel")
    x = torch.randn(tokens, 576).to(dtype)
    threads = torch.get_num_threads()
    with torch.no_grad():
        try:
            torch.set_num_threads(1)
            one = sparse(x)
            torch.set_num_threads(max(2, threads))
            many = sparse(x)
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(one, many)
    with torch.no_grad():  # the serial path (`kernel@1`) runs on the calling thread without changing the count
        assert torch.equal(sparse._kernel(x, parallel=False), many)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 2, 5, 8, 33, 100])
@pytest.mark.parametrize("hidden, d_ff", [(64, 96), (66, 201)])
def test_kernel_in_16_bits_sums_in_float32(tokens, hidden, d_ff, dtype):
    # From 4 tokens on, bf16 weights go by pairs of rows (vdpbf16ps where the CPU has it): 201 neurons leave a
    # row without a pair, and 402 / 66 columns end in a chunk that is neither full nor a whole number of vectors.
    sparse = _sparse(hidden=hidden, d_ff=d_ff, dtype=dtype)
    x = torch.randn(tokens, hidden).to(dtype)
    with torch.no_grad():
        sparse.set_path("kernel")
        got = sparse(x)
        for t in range(tokens):  # float32 from the same 16-bit weights and the same kept rows (16-bit inputs tie)
            v = x[t].float()
            idx = _keep_reference(v, sparse.n_in)
            h = v[idx] @ sparse.w_in_t.float()[idx]
            a = torch.nn.functional.silu(h[:d_ff]) * h[d_ff:]
            j = _keep_reference(a, sparse.n_act)
            ref = a[j] @ sparse.w_down_t.float()[j]
            # Within a 16-bit rounding of the output's scale (a random FFN's outputs are about 1e-3).
            assert (got[t].float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert got.dtype == dtype


@pytest.mark.parametrize("compute", [0.1, 0.5, 0.95])
def test_bf16_pairs_count_the_dropped_rows_they_multiply(compute):
    # From 4 tokens, bf16 rows go by pairs where the CPU has bf16 dot products: a dropped row beside a kept one is
    # multiplied by 0, and a block of pairs most tokens touch runs for all of them. The executed fraction counts
    # those products; the routed fraction does not.
    sparse = _sparse(hidden=64, d_ff=96, dtype=torch.bfloat16, compute=compute)
    sparse.set_path("kernel")
    with torch.no_grad():
        sparse(torch.randn(32, 64).bfloat16())
    routed, executed = sparse.routed_fraction(), sparse.executed_fraction()
    assert routed == pytest.approx(compute, abs=0.03)
    if cpu_kernels.isa() not in ("avx512-bf16", "avx512-bf16+amx"):
        assert executed == routed
    elif compute > 0.9:  # every input kept, nearly every neuron pair touched: every block runs densely
        assert executed == 1.0
    elif cpu_kernels.isa() == "avx512-bf16+amx":  # every pair any token keeps a row of, for every token
        assert routed < executed <= 1.0
    else:  # at most both rows of every pair a token keeps a row of
        assert routed < executed <= 2 * routed


def test_kernel_keeps_nan_inputs_so_they_show():
    sparse = _sparse()
    sparse.set_path("kernel")
    x = torch.randn(3, 40)
    x[1, 3] = float("nan")
    with torch.no_grad():
        y = sparse(x)
    # The token with the NaN shows it; the others, which read some of the same rows, do not.
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2]]).any()


def test_kernel_refuses_mismatched_tensors_with_one_line():
    sparse = _sparse()
    counts = torch.zeros(5, dtype=torch.int64)
    x = torch.randn(1, 40)
    with pytest.raises(RuntimeError, match="x must be contiguous tokens"):
        cpu_kernels.teal_ffn(x[0], sparse.w_in_t, sparse.w_down_t, 20, 20, None, None, counts)
    with pytest.raises(RuntimeError, match="x and the weights must share one dtype"):
        cpu_kernels.teal_ffn(x.double(), sparse.w_in_t, sparse.w_down_t, 20, 20, None, None, counts)
    with pytest.raises(RuntimeError, match="w_in_t must be a contiguous"):
        cpu_kernels.teal_ffn(x, sparse.w_in_t.t(), sparse.w_down_t, 20, 20, None, None, counts)
    with pytest.raises(RuntimeError, match="w_down_t must be a contiguous"):
        cpu_kernels.teal_ffn(x, sparse.w_in_t, sparse.w_down_t[:10], 20, 20, None, None, counts)
    with pytest.raises(RuntimeError, match="counts must be 5 contiguous int64"):
        cpu_kernels.teal_ffn(x, sparse.w_in_t, sparse.w_down_t, 20, 20, None, None, counts.int())


def test_kernel_is_offered_only_where_it_computes_the_routed_function(tiny_dirs, monkeypatch):
    gpt2 = SparseFFN(ffns(bricks.load_model(tiny_dirs["gpt2"])[0])[0], 0.5)  # GELU, ungated, with biases
    assert "kernel" not in gpt2.paths
    with pytest.raises(bricks.BricksError, match="kernel path is not available here: it needs a gated SiLU FFN"):
        gpt2.set_path("kernel@1")
    sparse = _sparse()
    sparse.set_path("kernel")
    # Switched off: the eager paths remain, and a kernel path fixed before says why it cannot run.
    monkeypatch.setenv("BRICKS_CPU_KERNELS", "0")
    cpu_kernels.reason.cache_clear()
    try:
        assert "kernel" not in sparse.paths and sparse.paths == sparse.eager_paths
        with pytest.raises(bricks.BricksError, match="BRICKS_CPU_KERNELS=0"):
            sparse(torch.randn(1, 40))
        with pytest.raises(bricks.BricksError, match="BRICKS_CPU_KERNELS=0"):
            sparse.set_path("kernel")
    finally:
        cpu_kernels.reason.cache_clear()


def _keep_reference(v: torch.Tensor, n: int) -> torch.Tensor:
    """The kernel's top-k rule, written plainly: the n largest |v| (NaN largest), ties with the n-th taken first
    come first; the kept indices in increasing order."""
    m = torch.where(torch.isnan(v), torch.full_like(v, float("inf")), v.abs())
    kth = m.sort(descending=True).values[n - 1]
    above = (m > kth).nonzero().view(-1)
    ties = (m == kth).nonzero().view(-1)[: n - above.numel()]
    return torch.cat([above, ties]).sort().values


def _assert_top_k_reference(sparse, x):
    """The kernel's output for tokens x is the one of the reference top-k (`_keep_reference`), every row counted."""
    sparse.set_path("kernel")
    d_ff = sparse.w_down_t.shape[0]
    with torch.no_grad():
        sparse.reset_counts()
        got = sparse(x)
        assert sparse.executed_fraction() == pytest.approx(sparse.compute_fraction())
        for t in range(x.shape[0]):
            idx = _keep_reference(x[t], sparse.n_in)
            h = x[t, idx] @ sparse.w_in_t[idx]
            a = torch.nn.functional.silu(h[:d_ff]) * h[d_ff:]
            j = _keep_reference(a, sparse.n_act)
            torch.testing.assert_close(got[t], a[j] @ sparse.w_down_t[j], rtol=1e-5, atol=1e-5)


def test_kernel_top_k_keeps_exactly_k_among_ties():
    """Tokens whose magnitudes tie (small integers; common in bf16) keep exactly k, the first ties first."""
    x = torch.randint(-2, 3, (6, 40)).float()  # magnitudes 0, 1 and 2 only
    _assert_top_k_reference(_sparse(hidden=40, d_ff=52), x)


def test_kernel_top_k_ranks_zeros_subnormals_and_large_magnitudes():
    """The k-th magnitude is found from the floats' bits, a bit at a time from the top: zeros, subnormals and
    magnitudes of 1e10 (exponent bits a float of at most 2 never sets) rank as the reference ranks them."""
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([0.0, 1e-45, 1e-40, 1e-38, 1e-3, 1.0, 1e10])
    x = scales[torch.randint(0, len(scales), (6, 40), generator=g)] * (1 + torch.rand(6, 40, generator=g))
    x = torch.where(torch.rand(6, 40, generator=g) < 0.5, -x, x)
    _assert_top_k_reference(_sparse(hidden=40, d_ff=52), x)


@pytest.mark.parametrize("hidden", [66, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [None, 0])
def test_brick_kernel_computes_the_bricks_path(dtype, shared, hidden):
    """Tokens of a bricked FFN in one kernel call: the function of the `bricks` path, for one token and for batches,
    reading the selected bricks only (counted); 200 neurons in 9 bricks leave padding rows, 23-wide bricks end in a
    partial vector, and 5 or 33 tokens leave a partial group of four (of 16 on AMX). On AMX, 66 inputs end in a
    partial tile (copied); 64 make whole tiles read in place, 46-row bricks read rows past their own, and the last
    brick's last tile is copied (no rows after it)."""
    from bricks.routing import BrickedFFN

    torch.manual_seed(0)
    f = ffns(random_ffn_model(hidden, 200, dtype))[0]
    assignment = torch.arange(200)[torch.randperm(200)] % 9
    ffn = BrickedFFN(f, assignment, shared, router="centroid", active=0.4)
    assert "kernel" in ffn.paths and "kernel" in ffn.paths_for(1) and "kernel" in ffn.paths_for(KERNEL_MAX_TOKENS)
    assert "kernel" not in ffn.paths_for(KERNEL_MAX_TOKENS + 1)
    threads = torch.get_num_threads()
    # Of the outputs' scale (a random FFN's are about 1e-3): fp16 keeps 3 more bits than bf16.
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    for tokens in (1, 2, 5, 33):
        x = torch.randn(tokens, hidden).to(dtype)
        with torch.no_grad():
            ffn.set_path("bricks")
            ref = ffn(x)
            ffn.set_path("kernel")
            ffn.reset_counts()
            got = ffn(x)
            sel = ffn.select(x)  # the kernel's own part: not the shared brick's matmul
            routed = ffn._kernel(x, sel)
            try:
                torch.set_num_threads(1)
                one = ffn._kernel(x, sel)
            finally:
                torch.set_num_threads(threads)
        # Executed, per token in bricks: gate|up on the chosen bricks (on AMX, on every token of a group of 16 in
        # which one chose the brick); down on the chosen bricks, and where bf16 row pairs run blocks densely up to
        # every brick (multiplied by 0).
        pairs = dtype == torch.bfloat16 and tokens >= 4 and cpu_kernels.isa() in ("avx512-bf16", "avx512-bf16+amx")
        if pairs and cpu_kernels.isa() == "avx512-bf16+amx":
            padded = torch.zeros(-(-tokens // 16) * 16, ffn.n_bricks, dtype=torch.bool)
            padded[:tokens] = sel
            touched = padded.reshape(-1, 16, ffn.n_bricks).any(dim=1)  # [groups, n_bricks]
            sizes = torch.tensor([min(16, tokens - 16 * g) for g in range(touched.shape[0])])
            gate_up = float((touched * sizes[:, None]).sum()) / tokens
        else:
            gate_up = float(sel.sum()) / tokens
        k = float(sel.sum()) / tokens
        lo = ffn._macs((2 * gate_up + k) / 3) / ffn.dense_macs_per_token()
        hi = ffn._macs((2 * gate_up + (ffn.n_bricks if pairs else k)) / 3) / ffn.dense_macs_per_token()
        assert lo - 1e-9 <= ffn.executed_fraction() <= hi + 1e-9, tokens
        assert (got.float() - ref.float()).abs().max() <= tol * ref.float().abs().max(), tokens
        assert torch.equal(one, routed), tokens  # the same sums in the same order on any number of threads


@pytest.mark.parametrize("hidden", [65, 64, 96, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_brick_kernel_matches_its_definition_on_any_width(dtype, hidden):
    """`brick_ffn` against its definition in float64, for widths whose bf16 inputs end in half a pair (65), fill
    whole tiles (64, 96; 2048: rows of 4 KB, which AMX reads two tiles at a time rather than four), and bricks of 23
    neurons (46 gate|up rows: tiles that reach into the next brick's rows, and past the weight's end for the last
    brick); 5 and 40 tokens (one group of 16, three with a partial one). `counts[1]`, the gate|up (token, brick)
    pairs run: the selected ones, and on AMX every token of each group of 16 that has one."""
    g = torch.Generator().manual_seed(5)
    w_in = (torch.randn(9, 46, hidden, generator=g) / hidden**0.5).to(dtype)
    w_down = (torch.randn(9, 23, hidden, generator=g) / 23**0.5).to(dtype)
    for tokens in (5, 40):
        x = torch.randn(tokens, hidden, generator=g).to(dtype)
        sel = torch.rand(tokens, 9, generator=g) < 0.3
        counts = torch.zeros(2, dtype=torch.int64)
        y = cpu_kernels.brick_ffn(x, w_in, w_down, sel, counts=counts)
        h = torch.einsum("th,brh->tbr", x.double(), w_in.double())
        a = torch.nn.functional.silu(h[..., :23]) * h[..., 23:] * sel[..., None]
        ref = torch.einsum("tbr,brh->th", a, w_down.double())
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (y.double() - ref).abs().max() <= tol * ref.abs().max(), tokens
        groups = torch.zeros(-(-tokens // 16) * 16, 9, dtype=torch.bool)
        groups[:tokens] = sel
        touched = groups.reshape(-1, 16, 9).any(dim=1)
        sizes = torch.tensor([min(16, tokens - 16 * i) for i in range(touched.shape[0])])
        amx = dtype == torch.bfloat16 and cpu_kernels.isa() == "avx512-bf16+amx"
        assert int(counts[1]) == int((touched * sizes[:, None]).sum() if amx else sel.sum()), tokens


def test_brick_kernel_is_offered_only_where_it_computes_the_routed_function(tiny_dirs, monkeypatch):
    from bricks.routing import BrickedFFN

    model = bricks.load_model(tiny_dirs["gpt2"])[0]  # GELU, ungated, with biases
    gpt2 = BrickedFFN(ffns(model)[0], torch.arange(ffns(model)[0].d_ff) % 4, router="centroid", active=0.5)
    assert "kernel" not in gpt2.paths and "kernel" not in gpt2.paths_for(1)
    with pytest.raises(bricks.BricksError, match="unknown execution path 'kernel'"):
        gpt2.set_path("kernel")
    f = ffns(random_ffn_model(64, 96))[0]
    # A router that computes the gate rows to route: the kernel would compute them again, uncounted.
    assert "kernel" not in BrickedFFN(f, torch.arange(96) % 4, router="threshold", active=0.5).paths
    # float64: the kernel sums in fp32, and float64 is asked for its precision (brick-wise execution is exact there).
    f64 = ffns(random_ffn_model(64, 96, torch.float64))[0]
    assert "kernel" not in BrickedFFN(f64, torch.arange(96) % 4, router="centroid", active=0.5).paths
    assert "kernel" not in SparseFFN(f64, 0.5).paths
    ffn = BrickedFFN(f, torch.arange(96) % 4, router="centroid", active=0.5)
    ffn.set_path("kernel")
    monkeypatch.setenv("BRICKS_CPU_KERNELS", "0")  # switched off after the path was fixed: it says why it cannot run
    cpu_kernels.reason.cache_clear()
    try:
        assert "kernel" not in ffn.paths
        with torch.no_grad(), pytest.raises(bricks.BricksError, match="kernel path is not available here: BRICKS_CPU"):
            ffn(torch.randn(1, 64))
    finally:
        cpu_kernels.reason.cache_clear()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3), (torch.float16, 1e-3)])
@pytest.mark.parametrize("size", [1, 23, 24, 40, 1536])  # shorter than a vector, partial vectors, whole ones; a
# thread's rows in many pieces (1536: 2 rows a piece)
def test_gated_silu_is_silu_of_each_gate_times_its_up(dtype, tol, size):
    torch.manual_seed(0)
    h = (3 * torch.randn(70, 5, 2 * size)).to(dtype)  # 70 tokens x 5 bricks: rows split over the threads unevenly
    a = cpu_kernels.gated_silu(h, size)
    ref = torch.nn.functional.silu(h[..., :size].float()) * h[..., size:].float()  # exact in fp32, rounded once
    assert a.shape == (70, 5, size) and a.dtype == dtype
    torch.testing.assert_close(a.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_kernels.gated_silu(h.transpose(0, 1), size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_path_takes_the_compiled_activation_only_without_gradients(dtype, monkeypatch):
    """The masked and dense paths of a bricked FFN compute every brick's activations in one compiled call at
    inference, and in eager torch where a gradient must flow (recovery)."""
    torch.manual_seed(0)
    f = ffns(random_ffn_model(48, 96, dtype))[0]
    bricked = bricks.routing.BrickedFFN(f, torch.arange(96) % 8, router="centroid", active=0.5)
    bricked.set_path("masked")
    calls = []
    real = cpu_kernels.gated_silu
    monkeypatch.setattr(cpu_kernels, "gated_silu", lambda h, size: calls.append(size) or real(h, size))
    x = torch.randn(5, 48).to(dtype)
    with torch.no_grad():
        y = bricked(x)
    assert calls == [bricked.brick_size]
    monkeypatch.setattr(type(bricked), "compiled_activation", lambda self, h: False)  # the eager activation
    with torch.no_grad():
        eager = bricked(x)
    torch.testing.assert_close(y, eager, **({} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}))
    bricked.w_in.requires_grad_(True)
    bricked(x).float().sum().backward()  # the eager activation: a gradient reaches the weights
    assert calls == [bricked.brick_size] and bricked.w_in.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_top_k_mask_is_torch_topk_with_ties_to_the_lower_index(dtype):
    g = torch.Generator().manual_seed(0)
    for n, k in ((64, 32), (64, 1), (64, 64), (7, 3), (100, 17)):
        scores = torch.randn(40, n, generator=g).to(dtype)
        mask = cpu_kernels.top_k_mask(scores, k)
        kth = scores.float().topk(k, dim=-1).values[:, -1:]
        assert (mask.sum(1) == k).all()
        assert (scores.float() > kth)[~mask].sum() == 0  # nothing left out outranks what is kept
        assert (scores.float() < kth)[mask].sum() == 0
    # Negatives below positives, -0.0 equal to 0.0, ties kept first come first, NaN above +inf (as torch.topk).
    scores = torch.tensor([[-1.0, -0.0, 2.0, 0.0, 2.0, float("nan"), float("inf"), -float("inf"), 2.0]])
    assert cpu_kernels.top_k_mask(scores, 4).nonzero()[:, 1].tolist() == [2, 4, 5, 6]
    assert cpu_kernels.top_k_mask(scores, 6).nonzero()[:, 1].tolist() == [1, 2, 4, 5, 6, 8]
    assert cpu_kernels.top_k_mask(scores, 7).nonzero()[:, 1].tolist() == [1, 2, 3, 4, 5, 6, 8]
    with pytest.raises(RuntimeError, match="k must be in"):
        cpu_kernels.top_k_mask(scores, 10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_top_k_ranks_fp32_scores_of_a_linear_router(dtype):
    """The centroid router's scores and top-k in one call: the k largest of x @ w.T summed in fp32 (torch's topk of
    float64 scores: no near-ties left to the summation order), for rows and bricks that are not multiples of the
    kernel's tiles of 4, widths that end in a partial vector (and an odd one, for bf16's pairs), and ties to the
    lower index among equal scores."""
    from bricks.routing import BrickedFFN

    g = torch.Generator().manual_seed(3)
    for rows, n, hidden, k in ((1, 64, 576, 32), (7, 9, 66, 4), (33, 13, 41, 5)):
        x, w = torch.randn(rows, hidden, generator=g).to(dtype), torch.randn(n, hidden, generator=g).to(dtype)
        scores = x.double() @ w.double().T
        got = cpu_kernels.linear_top_k(x, w, k)
        want = torch.zeros(rows, n, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
        margin = scores.sort(dim=1, descending=True).values
        clear = (margin[:, k - 1] - margin[:, k]).abs() > 1e-4 * margin.abs().max()  # rows with no near-tie at the k-th
        assert clear.sum() >= rows // 2 and torch.equal(got[clear], want[clear]), (rows, n, hidden)
        assert got.sum(1).eq(k).all()
    w = torch.ones(6, 8).to(dtype)  # every score equal: the lowest indices
    assert cpu_kernels.linear_top_k(torch.ones(2, 8).to(dtype), w, 3).nonzero()[:, 1].tolist() == [0, 1, 2] * 2
    with pytest.raises(RuntimeError, match="k must be in"):
        cpu_kernels.linear_top_k(x, torch.ones(3, x.shape[1]).to(dtype), 4)
    # The router uses it on the CPU in bf16 and fp16 (in fp32 torch's matmul was as fast).
    f = ffns(random_ffn_model(64, 96, dtype))[0]
    ffn = BrickedFFN(f, torch.arange(96) % 8, router="centroid", active=0.5)
    x = torch.randn(5, 64, generator=g).to(dtype)
    if dtype != torch.float32:
        assert torch.equal(ffn.select(x), cpu_kernels.linear_top_k(x, ffn.router.centroids, ffn.k_active))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_centroid_router_ranks_alike_without_the_kernel(dtype, monkeypatch):
    """Where the compiled call cannot run (a GPU, a CPU without a compiler) the router ranks the same fp32 sums: the
    same bricks for every token (ranked after rounding the scores to bf16, 6 tokens of 256 took others)."""
    from bricks.routing import BrickedFFN

    g = torch.Generator().manual_seed(0)
    f = ffns(random_ffn_model(576, 1024, dtype))[0]
    ffn = BrickedFFN(f, torch.arange(1024) % 64, router="centroid", active=0.25)
    x = torch.randn(256, 576, generator=g).to(dtype)
    compiled = ffn.select(x)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    assert torch.equal(ffn.select(x), compiled)
    with torch.no_grad():
        ffn.router.centroids.mul_(-1)  # changed in place: the fp32 copy follows
    assert not ffn.select(x)[compiled].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_top_magnitudes_keeps_the_largest_magnitudes_with_ties_to_the_lower_index(dtype):
    """The masked path's top-k: each row's k largest |v|, as a mask or as v with the rest zeroed; bf16's ties
    (common with its 8 bits of mantissa) kept first come first, as the teal kernel keeps them."""
    g = torch.Generator().manual_seed(0)
    for n, k in ((576, 345), (1536, 460), (100, 1), (100, 100), (7, 3), (33, 0)):
        v = torch.randn(40, n, generator=g).to(dtype)
        mask = cpu_kernels.top_magnitudes(v, k)
        assert mask.dtype == torch.bool and (mask.sum(1) == k).all()
        m = v.float().abs()
        if 0 < k:
            kth = m.topk(k, dim=-1).values[:, -1:]
            assert (m > kth)[~mask].sum() == 0 and (m < kth)[mask].sum() == 0  # nothing left out outranks the kept
            tie = (m == kth)
            first = tie & (tie.cumsum(1) <= (k - (m > kth).sum(1, keepdim=True)))  # the first ties in each row
            assert torch.equal(mask, (m > kth) | first)
        assert torch.equal(cpu_kernels.top_magnitudes(v, k, zero_dropped=True), torch.where(mask, v, torch.zeros_like(v)))
    # -0.0 and 0.0 tie; NaN is the largest magnitude; ties kept first come first.
    v = torch.tensor([[-1.0, -0.0, 2.0, 0.0, -2.0, float("nan"), float("-inf"), 0.5, 2.0]])
    assert cpu_kernels.top_magnitudes(v, 4).nonzero()[:, 1].tolist() == [2, 4, 5, 6]
    assert cpu_kernels.top_magnitudes(v, 8).nonzero()[:, 1].tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    with pytest.raises(RuntimeError, match="k must be in"):
        cpu_kernels.top_magnitudes(v, 10)
    with pytest.raises(RuntimeError, match="below float64"):
        cpu_kernels.top_magnitudes(v.double(), 3)


def _python(*args: str, **env) -> subprocess.CompletedProcess:
    """A fresh interpreter (one that has loaded no build of the ops) run with `args`, `env` added to this one's."""
    return subprocess.run([sys.executable, *args], env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=900)


def test_a_cpu_target_that_is_not_a_name_is_refused_with_its_reason():
    got = _python("-c", "from bricks.routing import cpu_kernels; print(cpu_kernels.reason())", BRICKS_CPU_MARCH="native -O0")
    assert "BRICKS_CPU_MARCH='native -O0' is not a compiler target name" in got.stdout, got.stderr[-2000:]


@pytest.mark.skipif(not cpu_kernels.available() or cpu_kernels.march() != "native"
                    or cpu_kernels.isa() not in ("avx512", "avx512-bf16", "avx512-bf16+amx"),
                    reason="the AVX2 build is the native one here, or this is that build's own run")
def test_the_avx2_build_passes_these_tests_too():
    """The AVX2 paths (`AVX2_LANES` in cpu_kernels.cpp) are compiled only without AVX-512, and CI machines are often
    AVX-512 ones: built for x86-64-v3 (AVX2, FMA, F16C), this file's other tests run again, in a process of their own
    (a process loads one build of the ops)."""
    isa = _python("-c", "from bricks.routing import cpu_kernels; cpu_kernels.available(); print(cpu_kernels.isa())",
                  BRICKS_CPU_MARCH="x86-64-v3")
    assert isa.stdout.strip() == "avx2", isa.stderr[-2000:]
    run = _python("-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not avx2_build and not without_amx",
                  BRICKS_CPU_MARCH="x86-64-v3")
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0 and "passed" in summary and "skipped" not in summary, run.stdout[-3000:] + run.stderr[-1000:]


@pytest.mark.skipif(not cpu_kernels.available() or cpu_kernels.isa() != "avx512-bf16+amx",
                    reason="no AMX here, or this is the run without it")
def test_the_kernel_without_amx_passes_these_tests_too():
    """Where AMX runs, a bf16 batch's blocks go to its tiles and add_block and add_pairs do not run: with
    BRICKS_CPU_AMX=0 they do, and this file's other tests run again in a process of their own."""
    run = _python("-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not avx2_build and not without_amx",
                  BRICKS_CPU_AMX="0")
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0 and "passed" in summary, run.stdout[-3000:] + run.stderr[-1000:]
    isa = _python("-c", "from bricks.routing import cpu_kernels; cpu_kernels.available(); print(cpu_kernels.isa())",
                  BRICKS_CPU_AMX="0")
    assert isa.stdout.strip() == "avx512-bf16", isa.stderr[-2000:]

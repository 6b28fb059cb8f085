"""GPU decoding paths, checked against the CPU reference: the triton sparse kernel (run by triton's interpreter where
there is no GPU), the grouped brick path, and greedy decoding with a static cache (captured in CUDA graphs on a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bricks
from bricks.arch import ffns
from bricks.decoding import GreedyDecoder
from bricks.routing import BrickedFFN, SparseFFN, cpu_kernels, kernels
from bricks.routing import kept_rows
from bricks.routing.kept_rows import CHUNK, kept_lists

from .test_sparse_ffn import _reference, _threshold_reference

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _needs_kernel(device):
    if kernels.triton is None:
        pytest.skip("triton is not installed (pip install triton): the kernel cannot run")
    if not kernels.available(torch.device(device)):
        pytest.skip(f"the triton kernel runs on CUDA, or on {device} only under TRITON_INTERPRET=1 (set in conftest.py "
                    "when no GPU is present)")


def _top_mask(v: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(v, dtype=torch.bool).scatter_(0, v.abs().topk(k).indices, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("design", kernels.DESIGNS)
def test_sparse_rows_reads_the_kept_rows(device, dtype, design, monkeypatch):
    """Either design (forced through BRICKS_TRITON_ROWS, as a user would) computes the product of the kept rows."""
    _needs_kernel(device)
    monkeypatch.setenv("BRICKS_TRITON_ROWS", design)
    g = torch.Generator().manual_seed(0)
    K, N = 300, 200  # not multiples of the blocks: edges masked
    w = torch.randn(K, N, generator=g).to(device, dtype)
    v = torch.randn(K, generator=g).to(device, dtype)
    counts = torch.zeros(3, dtype=torch.int64, device=device)
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    vf, wf = v.float(), w.float()
    y = kernels.sparse_rows(v, w, counts, 1, threshold=0.7)
    torch.testing.assert_close(y, (vf * (vf.abs() > 0.7)) @ wf, **tol)
    keep = torch.rand(K, generator=g).to(device) < 0.3
    y = kernels.sparse_rows(v, w, counts, 2, keep=keep)
    torch.testing.assert_close(y, (vf * keep) @ wf, **tol)
    # The down projection of a gated SiLU FFN: the activation computed from fp32 gate|up inside the kernel.
    h = torch.randn(2 * K, generator=g).to(device)
    a = F.silu(h[:K]) * h[K:]
    y = kernels.sparse_rows(h, w, counts, 2, threshold=0.2, silu_gated=True)
    torch.testing.assert_close(y, (a * (a.abs() > 0.2)) @ wf, **tol)
    # Rows read, counted on the device: inputs of the first call, neurons of the others, one token.
    assert counts.tolist() == [1, int((vf.abs() > 0.7).sum()), int(keep.sum() + (a.abs() > 0.2).sum())]
    # Per-token top-k, of the inputs and of the activations (no ties among random floats).
    counts.zero_()
    y = kernels.sparse_rows(v, w, counts, 1, top=70)
    torch.testing.assert_close(y, (vf * _top_mask(vf, 70)) @ wf, **tol)
    y = kernels.sparse_rows(h, w, counts, 2, top=50, silu_gated=True)
    torch.testing.assert_close(y, (a * _top_mask(a, 50)) @ wf, **tol)
    assert counts.tolist() == [1, 70, 50]
    with pytest.raises(ValueError, match="one of threshold, keep and top"):
        kernels.sparse_rows(v, w, counts, 1)
    with pytest.raises(ValueError, match="one of threshold, keep and top"):
        kernels.sparse_rows(v, w, counts, 1, threshold=0.1, top=3)
    with pytest.raises(ValueError, match="do not match"):
        kernels.sparse_rows(v[:10], w, counts, 1, threshold=0.1)
    with pytest.raises(ValueError, match="unknown sparse_rows design 'fast'"):
        kernels.sparse_rows(v, w, counts, 1, threshold=0.1, design="fast")


def test_the_faster_design_is_timed_once_per_shape(monkeypatch):
    """On a GPU each shape's first call times both designs and keeps the faster; the timing calls' row counts are
    undone. (The timer and the runs stand in for CUDA's here: the choice is what is tested.)"""
    if kernels.triton is None:
        pytest.skip("triton is not installed (pip install triton)")
    import triton.testing

    monkeypatch.setattr(kernels, "interpreting", lambda: False)
    monkeypatch.setattr(kernels, "_designs", {})
    ms, ran = {"predicated": 2.0, "gathered": 1.0}, []

    def run_of(name):
        def run(v, w_t, counts, *args):
            counts[1] += 5
            ran.append(name)
        return run

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep: (fn(), ms[ran[-1]])[1])
    runs = {name: run_of(name) for name in kernels.DESIGNS}
    w, v, counts = torch.zeros(8, 4), torch.zeros(8), torch.zeros(3, dtype=torch.int64)
    assert kernels._tuned_design(runs, v, w, counts, 1, 0.5, None, None, False) == "gathered"
    assert counts.tolist() == [0, 0, 0] and set(ran) == set(kernels.DESIGNS)
    ms["gathered"] = 3.0  # timed once: the choice stays
    assert kernels._tuned_design(runs, v, w, counts, 1, 0.5, None, None, False) == "gathered"
    assert kernels._tuned_design(runs, v, w.bfloat16(), counts, 1, None, None, 3, True) == "predicated"
    assert kernels.designs_for(w) == {"8x4 float32 threshold": "gathered"}
    assert kernels.designs_for() == {"8x4 float32 threshold": "gathered", "8x4 bfloat16 top silu": "predicated"}


@pytest.mark.parametrize("device", DEVICES)
def test_gathered_rows_lists_kept_rows_across_chunks(device):
    """The gathered design's lists: chunks with none, some and all of their rows kept, a last chunk cut short, and
    programs whose last chunks lie past the end; the product and the count are those of the kept rows. The top-k
    listing (one program over the vector) makes the same lists from magnitudes alone."""
    _needs_kernel(device)
    g = torch.Generator().manual_seed(1)
    K, N = 3 * CHUNK + 5, 70
    w = torch.randn(K, N, generator=g).to(device)
    keep = torch.zeros(K, dtype=torch.bool)
    keep[CHUNK:2 * CHUNK] = True  # the second chunk whole, the first none
    keep[2 * CHUNK::3] = True  # every third row of the third and the short fourth
    v = torch.randn(K, generator=g)
    counts = torch.zeros(3, dtype=torch.int64, device=device)
    y = kernels.sparse_rows(v.to(device), w, counts, 1, keep=keep.to(device), design="gathered")
    torch.testing.assert_close(y, (v.to(device) * keep.to(device)) @ w, atol=1e-3, rtol=1e-4)
    assert counts.tolist() == [1, int(keep.sum()), 0]
    big = torch.where(keep, 10 + v.abs(), v.clamp(-1, 1))  # the kept rows the largest magnitudes
    y = kernels.sparse_rows(big.to(device), w, counts, 2, top=int(keep.sum()), design="gathered")
    torch.testing.assert_close(y, (big.to(device) * keep.to(device)) @ w, atol=1e-3, rtol=1e-4)
    assert counts.tolist() == [1, int(keep.sum()), int(keep.sum())]


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_listing_keeps_ties_in_index_order_as_the_cpu_kernel(device):
    """Magnitudes tied at the k-th (bf16 has 8 bits of mantissa: ties are common) are kept first come first, across
    chunks, as the CPU kernel keeps them; NaN ranks as infinity; k at least the width keeps every row."""
    _needs_kernel(device)
    K = 2 * CHUNK + 40
    v = torch.full((K,), 0.5)
    v[::7] = -2.0  # 43 clear winners, then the rest tied at 0.5
    v[3] = float("nan")
    for k in (1, 10, 44, 100, K, K + 5):
        counts = torch.zeros(3, dtype=torch.int64, device=device)
        idx, val, n = kept_lists(v.to(device), K, counts, 2, None, None, k, False)
        kept = torch.zeros(K, dtype=torch.bool)
        for c, m in enumerate(n.tolist()):
            kept[idx[c * CHUNK:c * CHUNK + m].long().cpu()] = True
            torch.testing.assert_close(val[c * CHUNK:c * CHUNK + m].cpu(), v[idx[c * CHUNK:c * CHUNK + m].long().cpu()],
                                       equal_nan=True)
        assert int(kept.sum()) == min(k, K) == counts[2] and kept[3]
        want = torch.zeros(K, dtype=torch.bool)
        want[3] = True
        want[[i for i in range(0, K, 7) if i != 3][:min(k, K) - 1]] = True  # the clear winners
        ties = [i for i in range(K) if not want[i]][:max(0, min(k, K) - int(want.sum()))]
        want[ties] = True  # then the tied rows, first come first
        assert torch.equal(kept, want), k
        if cpu_kernels.available():
            assert torch.equal(cpu_kernels.top_magnitudes(v[None].contiguous(), min(k, K), zero_dropped=False)[0], want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_sparse_ffn_triton_path_is_the_routed_function(llama_dir, device, selection):
    """Decode tokens on the triton path compute what the CPU reference computes, and count what they read."""
    _needs_kernel(device)
    model, _ = bricks.load_model(llama_dir, device=device)
    f = ffns(model)[0]
    sparse = SparseFFN(f, compute=0.5, selection=selection)
    x = torch.randn(3, f.down_weight().shape[0], device=device)
    with torch.no_grad():
        if selection == "threshold":
            sparse.fit_thresholds(torch.randn(256, x.shape[1], device=device))
            ref = _threshold_reference(f, x, *sparse.thresholds)
        else:
            ref = _reference(f, x, sparse.n_in, sparse.n_act)
        sparse.set_path("triton")
        out = torch.cat([sparse(row) for row in x.split(1)])
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        routed, executed = sparse.routed_fraction(), sparse.executed_fraction()
        sparse.set_path("masked")
        sparse.reset_counts()
        sparse(x)
    assert routed == pytest.approx(sparse.routed_fraction())  # the same selection
    assert executed == pytest.approx(routed)  # it reads what it selected
    if selection == "topk":
        assert routed == pytest.approx(sparse.compute_fraction())


@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_masked_batches_fuse_their_selections_on_the_gpu(llama_dir, selection):
    """Several tokens on a GPU take `masked` with each projection's selection, zeroing and count in one kernel
    (`kept_rows.zero_dropped`): the function and the fractions of torch's masked path. (On the CPU, under the
    interpreter, the fused variant is called directly: the path takes it on CUDA only.)"""
    _needs_kernel("cpu")
    model, _ = bricks.load_model(llama_dir)
    sparse = SparseFFN(ffns(model)[0], compute=0.5, selection=selection)
    x = torch.randn(6, sparse.hidden)
    with torch.no_grad():
        if selection == "threshold":
            sparse.fit_thresholds(torch.randn(256, sparse.hidden))
        ref = sparse._masked(x)
        fractions = sparse.routed_fraction(), sparse.executed_fraction()
        sparse.reset_counts()
        torch.testing.assert_close(sparse._masked_fused(x), ref, atol=1e-5, rtol=1e-4)
    assert (sparse.routed_fraction(), sparse.executed_fraction()) == pytest.approx(fractions)
    assert fractions[1] == pytest.approx(1.0)  # the dense matmuls multiply every row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_dropped_keeps_each_tokens_rows(dtype):
    """Each token's own selection (threshold or top-k, of its inputs or of its activations), zeroed in place of the
    dropped rows, in the inputs' dtype; counted."""
    _needs_kernel("cpu")
    g = torch.Generator().manual_seed(2)
    K = 300
    v = torch.randn(4, K, generator=g).to(dtype)
    counts = torch.zeros(5, dtype=torch.int64)
    out = kept_rows.zero_dropped(v, K, counts, 1, threshold=0.8)
    vf = v.float()
    assert out.dtype == dtype and torch.equal(out.float(), vf * (vf.abs() > 0.8))
    out = kept_rows.zero_dropped(v, K, counts, 1, top=37)
    if cpu_kernels.available():  # bf16 ties at the k-th: kept in index order, as the CPU kernel keeps them
        assert torch.equal(out, cpu_kernels.top_magnitudes(v, 37, zero_dropped=True))
    if dtype == torch.float32:
        assert torch.equal(out, vf * torch.stack([_top_mask(row, 37) for row in vf]))
    kept = int((vf.abs() > 0.8).sum()) + 4 * 37
    assert counts.tolist() == [8, kept, 0, 8 * K - kept, 0]
    h = torch.randn(4, 2 * K, generator=g).to(dtype)
    a = F.silu(h[:, :K].float()) * h[:, K:].float()
    out = kept_rows.zero_dropped(h, K, counts, 2, top=20, silu_gated=True, dtype=torch.float32)
    torch.testing.assert_close(out, a * torch.stack([_top_mask(row, 20) for row in a]), atol=1e-6, rtol=1e-5)
    assert counts[2] == 4 * 20 and counts[4] == 4 * (K - 20)
    with pytest.raises(ValueError, match="not rows of 300 inputs"):
        kept_rows.zero_dropped(v[:, :10], K, counts, 1, top=3)


def test_triton_path_refuses_where_it_cannot_run(llama_dir, monkeypatch):
    model, _ = bricks.load_model(llama_dir)
    sparse = SparseFFN(ffns(model)[0], compute=0.5)
    monkeypatch.setattr(kernels, "available", lambda device: False)
    sparse.set_path("triton")
    with pytest.raises(bricks.BricksError, match="needs a CUDA device with triton"):
        sparse(torch.randn(1, 32))
    assert sparse.static_path(1) == "bags"  # where the kernel cannot run, decode tokens take the bags


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_brick_path_is_the_masked_function(llama_dir, device, dtype):
    """Every token's k bricks in two grouped GEMMs: the function of the masked path, at 1 token and at several."""
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("CUDA's grouped GEMMs take bfloat16")
    model, _ = bricks.load_model(llama_dir, device=device, dtype=dtype)
    f = ffns(model)[0]
    g = torch.Generator().manual_seed(0)
    ffn = BrickedFFN(f, torch.randperm(f.d_ff, generator=g) % 8, router="centroid", active=0.5)
    x = torch.randn(6, f.down_weight().shape[0], generator=g).to(device, dtype)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    with torch.no_grad():
        ffn.set_path("masked")
        ref = [ffn(x), ffn(x[:1])]
        ffn.set_path("grouped")
        ffn.reset_counts()
        out = [ffn(x), ffn(x[:1])]
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, **tol)
    assert ffn.executed_fraction() == pytest.approx(ffn.compute_fraction())  # only the selected bricks ran
    if dtype == torch.bfloat16:  # a decode token takes the triton path where it runs (below)
        assert ffn.static_path(1) == ("triton" if kernels.available(torch.device(device)) else "grouped")
        assert ffn.static_path(32) == "grouped"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_brick_rows_reads_the_selected_bricks(device, dtype):
    """One token through k of n bricks: gate|up rows as dot products, then the down rows with the activations
    computed inside; shapes that are not multiples of the tiles, so their edges are masked."""
    _needs_kernel(device)
    g = torch.Generator().manual_seed(0)
    n, size, hidden = 10, 70, 300
    w_in = torch.randn(n, 2 * size, hidden, generator=g).to(device, dtype) / hidden ** 0.5
    w_down = torch.randn(n, size, hidden, generator=g).to(device, dtype) / size ** 0.5
    x = torch.randn(hidden, generator=g).to(device, dtype)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    for chosen in ([7, 0, 3, 9, 4, 1], [5]):  # more bricks than one program sums, and one
        idx = torch.tensor(chosen, device=device)
        h = w_in[idx].float() @ x.float()
        a = F.silu(h[:, :size]) * h[:, size:]
        ref = torch.einsum("js,jsh->h", a, w_down[idx].float())
        torch.testing.assert_close(kernels.brick_rows(x, w_in, w_down, idx), ref, **tol)
    with pytest.raises(ValueError, match="do not match"):
        kernels.brick_rows(x[:10], w_in, w_down, idx)


@pytest.mark.parametrize("device", DEVICES)
def test_bricked_ffn_triton_path_is_the_routed_function(llama_dir, device):
    """A decode token on the triton path computes what `masked` computes and runs only its k bricks; a router
    whose brick count varies per token is refused with the reason."""
    _needs_kernel(device)
    model, _ = bricks.load_model(llama_dir, device=device)
    f = ffns(model)[0]
    g = torch.Generator().manual_seed(0)
    assignment = torch.randperm(f.d_ff, generator=g) % 8
    ffn = BrickedFFN(f, assignment, router="centroid", active=0.5)
    x = torch.randn(3, f.down_weight().shape[0], generator=g).to(device)
    with torch.no_grad():
        ffn.set_path("masked")
        ref = ffn(x)
        assert ffn.static_path(1) == "triton"
        ffn.set_path("triton")
        ffn.reset_counts()
        torch.testing.assert_close(ffn(x), ref, atol=1e-5, rtol=1e-4)
    assert ffn.executed_fraction() == pytest.approx(ffn.compute_fraction())
    varying = BrickedFFN(f, assignment, router="threshold", active=0.5)
    assert varying.static_path(1) != "triton" and "exactly k bricks" in varying._triton_refusal()


def _compile_for_hopper(fn, types: dict, constants: dict, num_warps: int = 4):
    """`fn` compiled by triton's own compiler (not the interpreter) to a cubin for sm_90 (H100, H200): the frontend
    and the ptxas that the triton wheel ships, no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**types, **{name: "constexpr" for name in constants}}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(name),): value for name, value in constants.items()})
    return kernels.triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def test_the_gpu_kernels_compile_for_a_hopper_gpu():
    """The interpreter runs the kernels' Python, not triton's compiler, which refuses more: every tile the brick
    kernels' autotuners try, and teal's kernel in its three forms, compile to cubins for an H100/H200. Under the
    interpreter (conftest.py, no GPU) the kernels are not compilable objects: the test runs again in a process
    without it."""
    if kernels.triton is None:
        pytest.skip("triton is not installed (pip install triton)")
    if "nvidia" not in getattr(kernels.triton.backends, "backends", {}):
        pytest.skip("this triton has no NVIDIA backend to compile with")
    if kernels.interpreting():
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                              "compile_for_a_hopper"], env={**os.environ, "TRITON_INTERPRET": "0"},
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
        return
    down_types = {"h_ptr": "*fp32", "w_ptr": "*bf16", "idx_ptr": "*i32", "out_ptr": "*fp32", "K_SEL": "i32",
                  "SIZE": "i32", "HIDDEN": "i32"}
    in_types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "idx_ptr": "*i32", "h_ptr": "*fp32", "HIDDEN": "i32", "ROWS": "i32"}
    for r, c, _ in kernels.BRICK_IN_CONFIGS:
        assert "cubin" in _compile_for_hopper(kernels._brick_gate_up, in_types, {"BLOCK_R": r, "BLOCK_C": c}).asm
    for r, n, b, _ in kernels.BRICK_DOWN_CONFIGS:
        assert "cubin" in _compile_for_hopper(kernels._brick_down, down_types, {"BLOCK_R": r, "BLOCK_N": n, "BRICKS": b}).asm
    teal_types = {"v_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*fp32", "keep_ptr": "*i1", "counts_ptr": "*i64",
                  "threshold": "fp32", "K": "i32", "N": "i32", "stride_w": "i32"}
    list_types = {"v_ptr": "*bf16", "keep_ptr": "*i1", "counts_ptr": "*i64", "idx_ptr": "*i32", "val_ptr": "*fp32",
                  "n_ptr": "*i32", "threshold": "fp32", "K": "i32"}
    top_types = {"v_ptr": "*bf16", "counts_ptr": "*i64", "idx_ptr": "*i32", "val_ptr": "*fp32", "n_ptr": "*i32",
                 "K": "i32", "KEEP": "i32", "N_CHUNKS": "i32"}
    tile = dict(zip(("BLOCK_N", "BLOCK_K", "ITERS", "LOOPS"), kernels.CONFIGS[0][:4]))
    for use_keep, silu_gated, slot in ((True, False, 1), (False, False, 1), (False, True, 2)):
        fp32 = {"v_ptr": "*fp32"} if silu_gated else {}
        flags = {"USE_KEEP": use_keep, "SILU_GATED": silu_gated, "COUNT_SLOT": slot}
        assert "cubin" in _compile_for_hopper(kernels._sparse_rows, {**teal_types, **fp32}, {**flags, **tile}).asm
        assert "cubin" in _compile_for_hopper(kept_rows._list_kept, {**list_types, **fp32}, {**flags, "CHUNK": CHUNK}).asm
        flags = {"SILU_GATED": silu_gated, "COUNT_SLOT": slot, "CHUNK": CHUNK, "CHUNKS_P2": 128}  # 11008 rows
        assert "cubin" in _compile_for_hopper(kept_rows._list_top_k, {**top_types, **fp32}, flags,
                                              num_warps=kept_rows.top_k_warps(86)).asm
    zero_types = {"v_ptr": "*bf16", "out_ptr": "*bf16", "counts_ptr": "*i64", "threshold": "fp32", "K": "i32",
                  "KEEP": "i32", "stride_v": "i32", "stride_out": "i32"}
    for use_top in (False, True):
        for silu_gated in (False, True):
            flags = {"USE_TOP": use_top, "SILU_GATED": silu_gated, "COUNT_SLOT": 1 + silu_gated, "CHUNK": CHUNK,
                     "CHUNKS_P2": 128}
            assert "cubin" in _compile_for_hopper(kept_rows._zero_dropped, zero_types, flags,
                                                  num_warps=kept_rows.top_k_warps(86)).asm
    listed_types = {"idx_ptr": "*i32", "val_ptr": "*fp32", "n_ptr": "*i32", "w_ptr": "*bf16", "out_ptr": "*fp32",
                    "N": "i32", "stride_w": "i32", "N_CHUNKS": "i32"}
    for n, k, chunks, warps in kept_rows.CONFIGS:
        tile = {"CHUNK": CHUNK, "CHUNKS": chunks, "BLOCK_K": k, "BLOCK_N": n}
        assert "cubin" in _compile_for_hopper(kept_rows._listed_rows, listed_types, tile, num_warps=warps).asm


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_decoder_matches_generate(llama_dir, device):
    """The static-cache step (captured in a CUDA graph on a GPU) decodes what `generate` decodes."""
    model, _ = bricks.load_model(llama_dir, device=device)
    ids = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.generate(ids.to(device), max_new_tokens=12, min_new_tokens=12, do_sample=False)[:, 7:].cpu()
    decoder = GreedyDecoder(model, max_len=32)
    assert decoder.graphs == (device == "cuda")
    assert torch.equal(decoder(ids, 12), ref)
    assert decoder.tokens_per_s() > 0
    with pytest.raises(bricks.BricksError, match="at most 20 tokens"):
        decoder(torch.zeros(1, 25, dtype=torch.long), 12)


def test_grouped_path_needs_aligned_rows(llama_dir):
    """Grouped GEMM kernels need rows of whole 16 bytes: bricks of 10 fp32 rows (40 bytes) leave the path out on
    CPU, where bricks are not padded, and the timed choice runs the others."""
    model, _ = bricks.load_model(llama_dir)
    f = ffns(model)[0]
    ffn = BrickedFFN(f, torch.arange(f.d_ff) % 7, router="centroid", active=0.5)  # 64 neurons: bricks of 9-10
    assert ffn.brick_size == 10 and "grouped" not in ffn.paths_for(4)
    x = torch.randn(4, f.down_weight().shape[0])
    with torch.no_grad():
        ffn(x)  # the chooser's paths only
        ffn.set_path("grouped")
        with pytest.raises(bricks.BricksError, match="grouped path needs"):
            ffn(x)

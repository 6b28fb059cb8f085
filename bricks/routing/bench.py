"""FFN latency: dense vs bricked, measured in one run so that ratios are fair on a shared machine."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import torch

from ..arch import ffns
from ..decoding import capture_graph
from ..loading import parse_dtype
from .bricked_ffn import BrickedFFN
from .paths import CHOOSER, FIRST_CALLS
from .sparse_ffn import SparseFFN


def random_ffn_model(hidden: int, d_ff: int, dtype=torch.float32, device: str = "cpu", layers: int = 1):
    """A Llama of `layers` layers (one by default) with random weights: speed does not depend on their values."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    heads = max(1, hidden // 128)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=8, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()


# A busy process that ends itself once its parent is gone: a bench killed by a signal (whose `finally` never runs)
# must not leave a core busy under the next measurement. Its parent is checked between short bursts of work.
_SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(100_000): pass\n"


# Distinct inputs the timed calls take in turn.
INPUTS = 64
# On CPU the timed calls go through copies of the FFN ("layers") holding at least this many bytes of weights in all,
# more than the last-level cache of most CPUs: in a model, the other layers' weights pass through the caches
# between two calls of one FFN, and a small FFN timed alone would run from the cache (576x1536 fp32, 10.6 MB,
# fits this machine's 32 MB L3).
CACHE_BYTES = 128 << 20
# A tiny FFN (a test's) would need thousands of copies: it runs from the cache anyway.
MAX_LAYERS = 32


def routed_ffn(ffn, router: str, active: float, assignment: torch.Tensor, selection: str = "topk"):
    """The routed FFN a bench times: teal's `SparseFFN` at compute `active` for `router="teal"`, else a
    `BrickedFFN` of `assignment`'s bricks with that router."""
    if router == "teal":
        return SparseFFN(ffn, compute=active, selection=selection)
    return BrickedFFN(ffn, assignment, router=router, active=active)


def layers_for(hidden: int, d_ff: int, dtype: torch.dtype, device) -> int:
    """How many copies of a hidden x d_ff FFN the bench cycles through (one on accelerators, see `_graph_times`)."""
    if str(device).startswith("cuda"):
        return 1
    ffn_bytes = 3 * hidden * d_ff * torch.finfo(dtype).bits // 8
    return min(MAX_LAYERS, max(1, -(-CACHE_BYTES // ffn_bytes)))


@contextlib.contextmanager
def competing_processes(n: int):
    """`n` other processes keeping a core busy each while the block runs: a laptop or a shared server's load."""
    procs = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(n)]
    try:
        if procs:
            time.sleep(0.5)  # let the scheduler spread them before anything is timed
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


# Calls of one side in a row on CPU (the first of them untimed), before the other side's turn.
BLOCK = 8
# Warm-up goes on until the chooser re-measures runner-ups this many calls apart (three losing re-measurements
# after its first choice), for at most SETTLE_CALLS more calls. The chooser's first re-measurements come 8, 16,
# then 32 calls apart (`bricks.routing.paths`): in a model, where an FFN shape's layers share their timings, they
# are over within the first few tokens; in a bench run of 20-30 timed calls, one of them (three calls of a path
# more than twice as slow) raised the routed mean by a fifth (bench/README.md, the teal grid).
SETTLED_INTERVAL, SETTLE_CALLS = 64, 100


def _call_times(dense: list, routed: list, xs: list[torch.Tensor], reps: int, device,
                min_seconds: float = 0.5, settled=lambda: True) -> tuple[list[float], list[float]]:
    """Seconds of calls of the `dense` FFNs and of the `routed` ones (copies of one FFN, see `CACHE_BYTES`), the
    calls taking the copies and the inputs `xs` in turn. On CUDA the first copy is replayed from a CUDA graph of the
    first input (see `_graph_times`).

    On CPU dense and routed take turns, BLOCK calls each on the same inputs, until each has `reps` timed calls and
    at least `min_seconds` have passed: a machine that drifts between slow and fast phases (a shared one does) moves
    both alike. In turns of blocks rather than call by call, because a call on one thread (an `@1` path) leaves
    torch's other threads idle long enough to fall asleep, and with a busy process on the other core the next call
    on two threads then waits a scheduler tick for one to wake: the dense FFN's median rose up to 7x after 2 ms on one
    thread (`bench/thread_wake.py`, `bench/README.md`), a cost a dense model, its calls back to back, does not pay. The first
    call of each block, which pays it, is not timed, on either side. (In a routed model the operation after an
    `@1` call pays that wake; only the end-to-end decode bench counts it.) Warm-up calls go on while `settled()` is
    false, up to SETTLE_CALLS."""
    if str(device).startswith("cuda"):
        return _graph_times(dense[0], xs[0], reps), _graph_times(routed[0], xs[0], reps)
    # Warm-up, and the routed FFN's paths' first timings (FIRST_CALLS of each path, and of each on one thread; with
    # `dense_fallback`, of `dense` too) and the chooser's first re-measurements: what a long decode has long behind
    # it. Derived from FIRST_CALLS: a count written for 4 first calls left part of the first timings of 5 in the
    # timed calls, on the routed side only.
    paths = len(getattr(routed[0], "paths", ())) + bool(getattr(routed[0], "dense_fallback", False))
    warm_up = 8 + 2 * FIRST_CALLS * paths
    for i in range(warm_up + SETTLE_CALLS):
        if i >= warm_up and settled():
            break
        dense[i % len(dense)](xs[i % len(xs)])
        routed[i % len(routed)](xs[i % len(xs)])
    times: tuple[list[float], list[float]] = ([], [])
    start, i = time.perf_counter(), 0
    while len(times[1]) < reps or time.perf_counter() - start < min_seconds:
        block = range(i, i + BLOCK)
        i += BLOCK
        for copies, out in zip((dense, routed), times):
            for n, j in enumerate(block):
                t = time.perf_counter()
                copies[j % len(copies)](xs[j % len(xs)])
                if n:
                    out.append(time.perf_counter() - t)
    return times


def _graph_times(module, x, reps: int, replays: int = 20) -> list[float]:
    """One call captured in a CUDA graph after warm-up calls (kernel autotuning, lazy buffers), then `reps` mean
    times of `replays` replays: the kernels' time, not Python's launch overhead, which would otherwise dominate a
    batch-1 call on a GPU (the same setting as decoding with graphs)."""
    graph = capture_graph(lambda: module(x))
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / replays)
    return times


def _median(v: list[float]) -> float:
    return sorted(v)[len(v) // 2]


@torch.no_grad()
def bench_ffn(shapes=((576, 1536), (4096, 11008)), dtypes=("float32", "bfloat16"), batches=(1, 32),
              actives=(0.5, 0.25), n_bricks: int = 64, router: str = "centroid", reps: int = 20,
              device: str = "cpu", busy: int = 0, path: str | None = None, dense_fallback: bool = False,
              selection: str = "topk", progress=print) -> list[dict]:
    """Latency of one FFN call, dense and bricked, for every combination: the median of the timed calls
    (`speedup` = dense / bricked) and their mean (`speedup_mean`).

    The two differ where calls stall. With a busy process on as many cores as there are threads, a call split
    over every thread waits a scheduler tick whenever one of them is descheduled, on a share of the calls: the
    median leaves those calls out, the mean counts them, as a run of many calls (a decode) does.

    `router="teal"` measures the activation-sparse FFN (`SparseFFN`) at compute fraction `active` instead.
    `busy` other processes spin on the CPU meanwhile. Each row names the execution path the routed FFN's
    timings chose (`bricks.routing.paths`), or `path` when given, and the compute fraction that path executed.
    `dense_fallback` lets the routed FFN run densely where that is faster (see `RoutedFFN`). `selection`
    ("topk" or "threshold") is teal's; thresholds are calibrated on inputs drawn like the timed ones.
    """
    with competing_processes(busy):
        return _bench(shapes, dtypes, batches, actives, n_bricks, router, reps, device, busy, path, dense_fallback,
                      selection, progress)


def _bench(shapes, dtypes, batches, actives, n_bricks, router, reps, device, busy, path, dense_fallback, selection,
           progress) -> list[dict]:
    rows = []
    for hidden, d_ff in shapes:
        for dtype_name in dtypes:
            dtype = parse_dtype(dtype_name)
            model = random_ffn_model(hidden, d_ff, dtype, device, layers_for(hidden, d_ff, dtype, device))
            layers = ffns(model)
            g = torch.Generator().manual_seed(0)
            assignment = torch.randperm(d_ff, generator=g) % n_bricks  # balanced random bricks
            dense = [f.module for f in layers]
            for batch in batches:
                # Decode-style inputs (one position), a new one each call: which rows a token keeps differs from
                # token to token, and a kernel timed on one input again and again would have its branches
                # predicted from memory, faster than on the new tokens of a decode.
                xs = [torch.randn(batch, 1, hidden, generator=g).to(device, dtype) for _ in range(INPUTS)]
                x = xs[0]
                for active in actives:
                    # teal: `active` is the FFN compute fraction (single neurons and inputs, no BrickSet)
                    copies = [routed_ffn(f, router, active, assignment, selection) for f in layers]
                    if router == "teal" and selection == "threshold":
                        calibration = torch.randn(4096, hidden, generator=g).to(device, dtype)
                        for c in copies:
                            c.fit_thresholds(calibration)
                    for c in copies:
                        c.set_path(path)
                        c.dense_fallback = dense_fallback
                    key = copies[0].timing_key(x.reshape(-1, hidden))

                    def settled():  # see SETTLED_INTERVAL; a fixed path is not chosen
                        t = CHOOSER.timings.get(key)
                        return path is not None or (t is not None and t.checking is None and
                                                    t.interval >= SETTLED_INTERVAL)

                    dense_times, routed_times = _call_times(dense, copies, xs, reps, device, settled=settled)
                    t_dense, t = _median(dense_times), _median(routed_times)
                    # The mean: what a run of these calls waits in all, stalls included (see `bench_ffn`'s doc).
                    mean_dense, mean = (sum(v) / len(v) for v in (dense_times, routed_times))
                    routed = copies[0]
                    chosen = routed.path or CHOOSER.best(key) or routed.untimed_path(batch)
                    # One more call, counted, on the chosen path: left to the chooser, it could be a runner-up's
                    # re-measurement, whose executed fraction would be reported as the chosen path's.
                    routed.set_path(chosen)
                    routed.reset_counts()
                    routed(x)
                    row = {"device": str(device), "timing": "cuda graph replays" if str(device).startswith("cuda") else "calls",
                           "hidden": hidden, "d_ff": d_ff, "dtype": dtype_name, "layers": len(layers), "batch": batch,
                           "active": active,
                           "router": router, "n_bricks": None if router == "teal" else n_bricks, "busy_processes": busy,
                           "selection": selection if router == "teal" else None,
                           "dense_fallback": dense_fallback,
                           "compute_fraction": round(routed.compute_fraction(), 4),
                           "path": chosen,
                           "executed_fraction": round(routed.executed_fraction(), 4),
                           "dense_ms": round(1e3 * t_dense, 3), "bricked_ms": round(1e3 * t, 3),
                           "speedup": round(t_dense / t, 3),
                           "dense_mean_ms": round(1e3 * mean_dense, 3), "bricked_mean_ms": round(1e3 * mean, 3),
                           "speedup_mean": round(mean_dense / mean, 3)}
                    if chosen == "triton" and router == "teal":  # which of its kernel's designs each projection took
                        from . import kernels

                        row["designs"] = kernels.designs_for(routed.w_in_t, routed.w_down_t)
                    rows.append(row)
                    if progress:
                        progress(f"{hidden}x{d_ff} {dtype_name:>8} batch {batch:>2} active {active:.2f}: dense {row['dense_ms']:8.3f} ms, "
                                 f"bricked {row['bricked_ms']:8.3f} ms, speedup x{row['speedup']:.2f} (mean x{row['speedup_mean']:.2f}; "
                                 f"compute {row['compute_fraction']:.3f}, "
                                 f"path {row['path']}, executed {row['executed_fraction']:.3f})"
                                 + (f", designs {row['designs']}" if "designs" in row else ""))
                    del routed, copies
            del model, layers, dense
    return rows

"""Choosing an execution path by timing (`bricks.routing.paths`): the fastest wins, and a path that stalls loses."""

from __future__ import annotations

import random

import pytest
import torch

import bricks
from bricks.arch import ffns
from bricks.routing import BrickedFFN, SparseFFN
from bricks.routing import cpu_kernels
from bricks.routing.sparse_ffn import KERNEL_MAX_TOKENS
from bricks.routing.paths import (FIRST_CALLS, FIRST_INTERVAL, MAX_INTERVAL, STALE_COST, STALE_SECONDS, PathChooser,
                                  expected_seconds, token_bucket)


def _drive(chooser, key, paths, cost, calls):
    """Run `calls` calls whose time is `cost[path]`; returns the paths taken."""
    taken = []
    for _ in range(calls):
        p = chooser.choose(key, paths)
        chooser.record(key, p, cost[p])
        taken.append(p)
    return taken


def test_every_path_is_timed_then_the_fastest_runs():
    c, key, paths = PathChooser(), ("ffn",), ("bags", "split", "masked")
    taken = _drive(c, key, paths, {"bags": 3.0, "split": 1.0, "masked": 2.0}, 200)
    # FIRST_CALLS each (the first is warm-up), then the fastest.
    assert taken[:3 * FIRST_CALLS] == [p for p in paths for _ in range(FIRST_CALLS)]
    assert c.best(key) == "split"
    later = taken[3 * FIRST_CALLS:]
    # The others are re-measured now and then, less often while they keep losing.
    assert later.count("split") > 0.9 * len(later) and {"bags", "masked"} <= set(later)
    assert c.timings[key].interval == MAX_INTERVAL or c.timings[key].interval > FIRST_INTERVAL


def test_a_path_that_starts_to_stall_is_left_and_found_again():
    c, key, paths = PathChooser(), ("ffn",), ("bags", "split")
    _drive(c, key, paths, {"bags": 2.0, "split": 1.0}, 50)
    assert c.best(key) == "split"
    # Another process takes a core: the split call now waits for a descheduled thread.
    taken = _drive(c, key, paths, {"bags": 2.0, "split": 30.0}, 20)
    assert taken[-10:].count("bags") >= 9 and c.best(key) == "bags"
    # The machine goes quiet again: the runner-up is re-measured, and wins back its place.
    taken = _drive(c, key, paths, {"bags": 2.0, "split": 1.0}, 400)
    assert c.best(key) == "split" and taken[-20:].count("split") >= 19


def test_paths_about_as_fast_trade_the_lead_without_bringing_back_frequent_re_measurements():
    c, key, paths = PathChooser(), ("ffn",), ("kernel", "dense", "masked")
    # kernel and dense within 5% of each other, call by call; masked three times as slow (twice would make it a
    # path that could win once a load has gone, re-measured for that too, at most a thirtieth of the time: STALE_COST).
    rng, slow_calls = random.Random(0), 0
    for _ in range(3000):
        cost = {"kernel": 1.0 + 0.05 * rng.random(), "dense": 1.0 + 0.05 * rng.random(), "masked": 3.0}
        slow_calls += _drive(c, key, paths, cost, 1) == ["masked"]
    # masked is re-measured as any steady loser is (8 calls here); when every narrow win of kernel or dense brought
    # the re-measurements back to every FIRST_INTERVAL calls, 53.
    assert slow_calls < 20
    # A clear win (the load changed) still brings the re-measurements back to every FIRST_INTERVAL calls.
    c2 = PathChooser()
    _drive(c2, key, ("bags", "split"), {"bags": 1.0, "split": 2.0}, 300)
    for calls in range(600):  # until split takes the lead, its re-measurement over
        _drive(c2, key, ("bags", "split"), {"bags": 1.0, "split": 0.8}, 1)
        if c2.best(key) == "split" and c2.timings[key].checking is None:
            break
    assert c2.best(key) == "split" and c2.timings[key].interval == FIRST_INTERVAL, calls
    taken = _drive(c2, key, ("bags", "split"), {"bags": 1.0, "split": 0.8}, 100)
    assert taken.count("split") >= 85


def test_a_slow_runner_up_is_re_measured_less_often_than_a_close_one():
    c, key, paths = PathChooser(), ("ffn",), ("kernel", "masked", "bricks")
    cost = {"kernel": 1.0, "masked": 1.2, "bricks": 10.0}
    taken = _drive(c, key, paths, cost, 5000)[3 * FIRST_CALLS:]
    # Each runner-up's re-measurements take about the same time in all: bricks, 10x the best, is re-measured
    # about a tenth as often as masked. (In turn, as these calls' counts fell, bricks took 30 and masked 83.)
    spent = {p: taken.count(p) * cost[p] for p in ("masked", "bricks")}
    assert taken.count("bricks") > 0 and max(spent.values()) < 1.5 * min(spent.values())
    assert taken.count("kernel") > 0.95 * len(taken)



def test_a_path_timed_under_a_load_that_has_gone_is_soon_re_measured():
    """A path timed while it stalled (another process busy) is re-measured once its timings are STALE_SECONDS of
    calls old, and wins again when the load has gone; under a load that stays, that costs a small share of the
    time. Costs as in bench/chooser_recovery.py (576x1536 bf16, 8 tokens): with the load, the kernel on two threads
    waits 20 ms for a descheduled thread on every other call; the one-thread paths do not."""
    c, key = PathChooser(), ("ffn",)
    paths = ("kernel", "masked", "kernel@1", "masked@1")
    loaded = {"kernel@1": 0.6e-3, "masked": 2.0e-3, "masked@1": 1.5e-3}
    spent = {p: 0.0 for p in paths}
    for n in range(20_000):  # about 13 s of calls with the load
        p = c.choose(key, paths)
        seconds = loaded.get(p, 20e-3 if n % 2 else 0.35e-3)
        c.record(key, p, seconds)
        spent[p] += seconds
    assert c.best(key) == "kernel@1"
    assert spent["kernel"] < 0.05 * sum(spent.values())  # its first timings and re-measurements, stalls included
    idle = {"kernel": 0.33e-3, "kernel@1": 0.59e-3, "masked": 0.87e-3, "masked@1": 1.46e-3}
    after = _drive(c, key, paths, idle, 4000)  # 2.4 s of calls without it
    assert c.best(key) == "kernel" and after[-100:].count("kernel") >= 90
    # Back on the kernel once its timings are STALE_SECONDS old and the last re-measurement's STALE_COST has passed
    # (a stalled call and a fast one, say); without the rule, not in these 4000 calls.
    assert after.index("kernel") * 0.59e-3 < STALE_SECONDS + STALE_COST * (20e-3 + 0.35e-3)

def test_first_timing_is_warm_up_and_keys_are_separate():
    c, paths = PathChooser(), ("a", "b")
    assert c.choose(("k",), paths) == "a"
    c.record(("k",), "a", 100.0)  # the first, cold timing
    assert c.choose(("k",), paths) == "a"  # timed once only: again
    c.record(("k",), "a", 1.0)  # the second timing replaces the first, cold one
    assert c.timings[("k",)].seconds["a"] == 1.0
    assert c.best(("other",)) is None


def test_one_stalled_first_call_does_not_decide():
    """A scheduler tick in one of a path's first timed calls (ten times its time) must not hand the lead to a
    slower path: the first choice rests on the median of several calls."""
    c, key, paths = PathChooser(), ("ffn",), ("kernel", "kernel@1")
    stalls = iter([1.0, 10.0])  # the cold first call, then one stalled call; then 1.0 every call

    def cost(p):
        return next(stalls, 1.0) if p == "kernel" else 1.8

    taken = []
    for _ in range(2 * FIRST_CALLS + 4):
        p = c.choose(key, paths)
        c.record(key, p, cost(p))
        taken.append(p)
    assert c.best(key) == "kernel" and taken[-4:] == ["kernel"] * 4


def test_a_path_that_stalls_on_a_third_of_its_calls_loses_to_a_steady_one():
    """With a busy process, a call split over both threads waits a scheduler tick on a share of its calls: its
    median stays low, but a decode waits for the sum of its calls. A steady one-thread path that is slower by the
    median but faster on average must win."""
    c, key, paths = PathChooser(), ("ffn",), ("kernel", "kernel@1")
    calls = {"kernel": 0}

    def cost(p):
        if p == "kernel@1":
            return 2.0
        calls["kernel"] += 1
        return 5.5 if calls["kernel"] % 3 == 0 else 1.3  # median 1.3, mean 2.7

    taken = []
    for _ in range(300):
        p = c.choose(key, paths)
        c.record(key, p, cost(p))
        taken.append(p)
    assert c.best(key) == "kernel@1" and taken[-100:].count("kernel@1") >= 90


def test_expected_seconds_leaves_out_a_lone_stall():
    assert expected_seconds([1.0, 2.0, 6.0]) == 3.0  # a re-measurement's three calls all count
    assert expected_seconds([1.0, 3.0, 2.0, 100.0]) == 2.0  # one stall among four or more does not
    assert expected_seconds([1.0, 1.0, 1.0, 5.0, 5.0]) == 2.6  # two do: a path's rare but long stalls are counted
    assert expected_seconds([1.0, 1.5, 1.0, 1.5]) == 1.25  # no stall: the slowest is not left out
    # Rare long stalls, one per window of 8 timings: each window alone would leave its stall out; 16 hold two.
    stalled = [1.5] * 7 + [30.0]
    assert expected_seconds(stalled) == 1.5 and expected_seconds(stalled * 2) > 5.0


def test_token_buckets():
    assert [token_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 32, 33)] == [1, 2, 4, 4, 8, 8, 16, 32, 64]


@pytest.mark.parametrize("kind", ["teal", "bricks"])
def test_dense_fallback_is_opt_in_and_counted(llama, kind, monkeypatch):
    """Without `dense_fallback` no call may leave the routed function; with it, `dense` is one more path, which
    computes the dense FFN and counts as the whole of it."""
    from bricks.routing import base, paths

    model, _ = llama
    f = ffns(model)[0]
    routed = SparseFFN(f, 0.5) if kind == "teal" else \
        BrickedFFN(f, bricks.partition(model, "random", 8).assignments[0], router="centroid", active=0.5)
    offered = []

    class DensePath(PathChooser):  # takes `dense` when offered, as if it were the fastest
        def choose(self, key, paths):
            offered.append(paths)
            return "dense" if "dense" in paths else paths[0]

        def record(self, key, path, seconds):
            pass

    fake = DensePath()
    monkeypatch.setattr(base, "CHOOSER", fake)
    monkeypatch.setattr(paths, "CHOOSER", fake)
    x = torch.randn(4, 32)
    with torch.no_grad():
        routed(x)
        assert "dense" not in offered[-1]
        routed.dense_fallback = True
        routed.reset_counts()
        y = routed(x)
        assert "dense" in offered[-1]
        torch.testing.assert_close(y, f.module(x), rtol=1e-5, atol=1e-6)
    assert routed.executed_fraction() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["teal", "bricks"])
def test_the_dense_path_runs_a_copy_in_the_dense_layout_kept_only_while_it_may_run(llama, kind, monkeypatch):
    """`dense` multiplies the weights as the dense model lays them out (`[out, in]`: torch's bf16 products were slower
    on the routed storage), made once and kept while `dense_fallback` is on, made again when the weights change."""
    import copy as copies

    from bricks.routing import base, paths

    model = copies.deepcopy(llama[0])  # its weights change below
    f = ffns(model)[0]
    routed = SparseFFN(f, 0.5) if kind == "teal" else \
        BrickedFFN(f, bricks.partition(model, "random", 8).assignments[0], router="centroid", active=0.5)
    take = {"path": "dense"}

    class Fixed(PathChooser):
        def choose(self, key, offered):
            return take["path"] if take["path"] in offered else offered[0]

        def record(self, key, path, seconds):
            pass

    monkeypatch.setattr(base, "CHOOSER", Fixed())
    monkeypatch.setattr(paths, "CHOOSER", Fixed())

    def copy():
        if kind == "teal":
            return routed._model_layout and routed._model_layout[1]
        return routed._dense_cache and (routed._dense_cache["gate"], routed._dense_cache["down"])

    x = torch.randn(4, 32)
    routed.dense_fallback = True
    with torch.no_grad():
        routed(x)
        first = copy()
        assert first[0].shape[0] > first[0].shape[1] == 32 and first[0].is_contiguous()  # [out, in]
        assert first[1].shape == (32, f.d_ff) and first[1].is_contiguous()
        take["path"] = "kernel" if kind == "teal" and "kernel" in routed.paths_for(4) else "masked"
        routed(x)  # a routed call between two dense ones keeps the copy
        take["path"] = "dense"
        routed(x)
        assert copy()[0] is first[0]
        f.gate_weight().mul_(2), f.up_weight().mul_(2)  # weights changed in place: a new copy
        if kind == "teal":
            routed.w_in_t.mul_(2)
        else:
            routed.w_in.mul_(2)
            routed.refresh()  # as recovery training does after changing them
        torch.testing.assert_close(routed(x), f.module(x), rtol=1e-5, atol=1e-6)
        assert copy()[0] is not first[0]
        routed.dense_fallback = False
        take["path"] = "masked"
        routed(x)
        assert not copy()


@pytest.mark.parametrize("kind", ["teal", "bricks"])
def test_off_the_cpu_the_dense_path_makes_no_copy(llama, kind):
    """Off the CPU `dense` runs on the routed storage: the copy's layout was measured to pay only on CPUs, and a
    GPU's memory is scarcer. The meta device stands for a GPU (the rule looks only at the device's type)."""
    model, _ = llama
    f = ffns(model)[0]
    routed = SparseFFN(f, 0.5) if kind == "teal" else \
        BrickedFFN(f, bricks.partition(model, "random", 8).assignments[0], router="centroid", active=0.5)
    routed.to("meta")
    routed.dense_fallback = True
    with torch.no_grad():
        assert routed(torch.empty(8, 32, device="meta")).shape == (8, 32)
    assert (routed._model_layout if kind == "teal" else routed._dense_cache) is None


@pytest.mark.parametrize("kind", ["teal", "bricks"])
def test_off_the_cpu_only_a_batch_falls_back_to_dense(llama, kind):
    """Off the CPU calls are not timed: with `dense_fallback` a batch takes `dense` there (the routed batch paths
    lost to it on a GPU), a decode token keeps its sparse path; without it nothing leaves the routed function. A
    tensor on the meta device stands for one on a GPU (the rule looks only at the device's type)."""
    model, _ = llama
    f = ffns(model)[0]
    routed = SparseFFN(f, 0.5) if kind == "teal" else \
        BrickedFFN(f, bricks.partition(model, "random", 8).assignments[0], router="centroid", active=0.5)
    batch, token = torch.empty(8, 32, device="meta"), torch.empty(1, 32, device="meta")
    assert routed.choose_path(batch) == (routed.static_path(8), None) and routed.static_path(8) != "dense"
    routed.dense_fallback = True
    assert routed.choose_path(batch) == ("dense", None)
    assert routed.choose_path(token) == (routed.static_path(1), None) and routed.static_path(1) != "dense"


def test_a_serial_path_runs_on_one_thread_and_gives_the_threads_back(llama):
    model, _ = llama
    sparse = SparseFFN(ffns(model)[0], 0.5)
    x = torch.randn(4, 32)
    seen, masked = [], sparse._masked

    def spy(v):
        seen.append(torch.get_num_threads())
        return masked(v)

    sparse._masked = spy
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            sparse.set_path("masked")
            y = sparse(x)
            sparse.set_path("masked@1")
            torch.testing.assert_close(sparse(x), y)
            assert seen == [2, 1] and torch.get_num_threads() == 2
            sparse._masked = lambda v: 1 / 0  # a failing call gives the threads back too
            with pytest.raises(ZeroDivisionError):
                sparse(x)
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(bricks.BricksError, match="unknown execution path 'bricks@1'"):
        sparse.set_path("bricks@1")


def test_paths_offered_to_several_tokens(llama, monkeypatch):
    model, _ = llama
    sparse = SparseFFN(ffns(model)[0], 0.5)
    kernel = ("kernel",) if cpu_kernels.available() else ()  # one compiled call for all the tokens, once built
    assert sparse.paths_for(1) == (kernel or ("bags", "split", "masked"))
    assert sparse.paths == ("bags", "split", "masked", *kernel)  # every path can still be fixed
    # The timing key of a call shape is kept, and renewed when the settings change.
    x = torch.randn(1, 32)
    assert sparse.choose_path(x)[1] == sparse.timing_key(x)
    sparse.set_compute(0.25)
    assert sparse.choose_path(x)[1] == sparse.timing_key(x) != SparseFFN(ffns(model)[0], 0.5).timing_key(x)
    # 4 tokens x ~0.5 of the weights each: the kernel where it is built (one call, each row read once), else bags
    assert sparse.paths_for(4) == (("kernel", "masked") if kernel else ("bags", "masked"))
    assert sparse.paths_for(KERNEL_MAX_TOKENS) == (("kernel", "masked") if kernel else ("masked",))
    assert sparse.paths_for(KERNEL_MAX_TOKENS + 1) == ("masked",)
    monkeypatch.setenv("BRICKS_CPU_KERNELS", "0")
    cpu_kernels.reason.cache_clear()
    try:
        assert SparseFFN(ffns(model)[0], 0.5).paths_for(4) == ("bags", "masked")
    finally:
        monkeypatch.undo()
        cpu_kernels.reason.cache_clear()


def test_busy_processes_end_with_a_bench_killed_by_a_signal():
    """A bench stopped by SIGTERM runs no `finally`: its busy processes must still go, or they load the next run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import sys, time\nfrom bricks.routing.bench import competing_processes\n"
              "with competing_processes(1) as procs:\n    print(procs[0].pid, flush=True)\n    time.sleep(60)\n")
    bench = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(bench.stdout.readline())
    os.kill(child, 0)  # busy while the bench runs
    bench.send_signal(signal.SIGTERM)
    bench.wait(10)
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        try:  # reaped by init once it ends: a zombie would still answer kill(0)
            if open(f"/proc/{child}/stat").read().split()[2] == "Z":
                return
        except OSError:
            return
        time.sleep(0.1)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the busy process outlived the bench")


def test_ffn_bench_times_calls_on_distinct_inputs_and_copies():
    """A kernel timed on one input again and again has its branches predicted from memory, and an FFN called alone
    runs from the cache: the bench cycles through distinct inputs and copies of the FFN, dense and routed alike, in
    blocks whose first call is not timed."""
    from bricks.routing.bench import BLOCK, _call_times

    seen = {"dense": [], "routed": []}
    copies = {side: [lambda x, side=side, c=c: seen[side].append((c, id(x))) for c in range(3)] for side in seen}
    xs = [torch.randn(2, 3) for _ in range(4)]
    dense_times, routed_times = _call_times(copies["dense"], copies["routed"], xs, reps=2 * BLOCK, device="cpu",
                                            min_seconds=0.0)
    assert len(dense_times) == len(routed_times) == 3 * (BLOCK - 1)  # three blocks of BLOCK - 1 timed calls
    timed = seen["dense"][-BLOCK:]  # the last block, after the warm-up calls
    assert seen["dense"] == seen["routed"]
    assert {c for c, _ in timed} == {0, 1, 2} and {x for _, x in timed} == {id(x) for x in xs}


def test_ffn_bench_warm_up_lasts_until_the_chooser_settles():
    """The chooser's first re-measurements of slower paths, which a model's layers have behind them within a few
    tokens, are warm-up: timed calls start once `settled()` says so, or after SETTLE_CALLS more calls."""
    from bricks.routing.bench import BLOCK, SETTLE_CALLS, _call_times

    calls = []

    def routed(x):
        calls.append(x)

    x = torch.randn(1, 3)
    timed_calls = 2 * BLOCK  # two blocks of BLOCK - 1 timed calls for reps=BLOCK
    _call_times([lambda x: None], [routed], [x], reps=BLOCK, device="cpu", min_seconds=0.0,
                settled=lambda: len(calls) >= 30)
    assert len(calls) == 30 + timed_calls
    calls.clear()
    _call_times([lambda x: None], [routed], [x], reps=BLOCK, device="cpu", min_seconds=0.0, settled=lambda: False)
    assert len(calls) == 8 + SETTLE_CALLS + timed_calls  # 8: the fixed warm-up of an FFN with no paths to time


def test_ffn_bench_cycles_through_more_weights_than_the_cache():
    from bricks.routing.bench import CACHE_BYTES, layers_for

    assert layers_for(576, 1536, torch.float32, "cpu") == 13  # 10.6 MB each
    assert layers_for(576, 1536, torch.bfloat16, "cpu") == 26
    assert layers_for(4096, 11008, torch.float32, "cpu") == 1  # 541 MB
    assert layers_for(576, 1536, torch.float32, "cuda") == 1  # graph replays of one copy
    assert layers_for(32, 64, torch.float32, "cpu") == 32  # capped: a tiny FFN runs from the cache anyway
    assert 13 * 3 * 576 * 1536 * 4 >= CACHE_BYTES > 12 * 3 * 576 * 1536 * 4


def test_ffn_bench_counts_the_path_it_reports(monkeypatch):
    """The executed fraction a bench row reports is that of its path, not of a runner-up the chooser happened to
    re-measure on the counted call."""
    from bricks.routing import bench
    from bricks.routing.paths import PathChooser

    chooser = PathChooser()
    monkeypatch.setattr(bench, "CHOOSER", chooser)
    monkeypatch.setattr("bricks.routing.base.CHOOSER", chooser)
    monkeypatch.setattr("bricks.routing.paths.CHOOSER", chooser)
    # The chooser re-measures a runner-up on every call from the counted one on, and names `bricks` the best.
    monkeypatch.setattr(chooser, "choose", lambda key, paths: "masked")
    monkeypatch.setattr(chooser, "best", lambda key: "bricks")
    monkeypatch.setattr(chooser, "record", lambda key, path, seconds: None)
    rows = bench.bench_ffn(shapes=((32, 64),), dtypes=("float32",), batches=(1,), actives=(0.5,), n_bricks=8, reps=2,
                           progress=None)
    assert rows[0]["path"] == "bricks"
    assert rows[0]["executed_fraction"] == pytest.approx(rows[0]["compute_fraction"])  # not masked's 1.0


def test_ffn_bench_warm_up_covers_every_path_first_timings(monkeypatch):
    """The timed calls start after the chooser timed each path (and each on one thread) FIRST_CALLS times: first
    timings among the timed calls would count the routed FFN's slower paths against it."""
    from bricks.routing import bench
    from bricks.routing.paths import with_serial

    chooser = PathChooser()
    monkeypatch.setattr("bricks.routing.base.CHOOSER", chooser)
    monkeypatch.setattr("bricks.routing.paths.CHOOSER", chooser)
    torch.manual_seed(0)
    sparse = SparseFFN(ffns(bricks.routing.bench.random_ffn_model(32, 64))[0], 0.5)
    x = torch.randn(2, 32)
    key = sparse.timing_key(x)
    offered = with_serial(sparse.paths_for(2), torch.get_num_threads())
    settled = []

    def routed(x):
        t = chooser.timings.get(key)
        settled.append(t is not None and all(t.samples.get(p, 0) >= FIRST_CALLS for p in offered))
        return sparse(x)

    routed.paths = sparse.paths  # what the bench reads of the routed FFN
    with torch.no_grad():
        _, timed = bench._call_times([lambda x: None], [routed], [x], reps=bench.BLOCK, device="cpu", min_seconds=0.0)
    blocks = len(timed) // (bench.BLOCK - 1)  # each block's calls, its first untimed
    assert len(offered) > 2 and all(settled[-blocks * bench.BLOCK:])

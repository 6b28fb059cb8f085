"""Probe: how soon a routed FFN's path chooser finds its fast path again once another process stops being busy.

With a busy process on a 2-core machine, a call split over both threads waits for a descheduled one on a share of
its calls, and the chooser (`bricks/routing/paths.py`) moves the FFN onto a one-thread path (`@1`). When the
load ends, the two-thread path is the fastest again, but the chooser only learns that by re-measuring it. This
runs one FFN of `bench_ffn.py`'s kind, dense and routed in turns of 8 calls as there, first with one busy process
(`--busy-blocks` turns), then without (`--idle-blocks` turns), and reports: the path the chooser took at the end
of each phase, how many routed calls of the idle phase ran before the chooser's best path was one on all threads,
and the mean time per routed and dense call in each phase (the busy phase's routed mean pays the re-measurements
of stalling paths; the idle phase's pays the calls spent on the one-thread path).

    python bench/chooser_recovery.py --router teal --json bench/results/chooser_recovery_teal_after1_zen4_cpu.json
"""

from __future__ import annotations

import argparse
import time

import torch

from bricks.arch import ffns
from bricks.loading import parse_dtype
from bricks.routing.bench import BLOCK, INPUTS, competing_processes, layers_for, random_ffn_model, routed_ffn
from bricks.routing.paths import CHOOSER, SERIAL
from record import save


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--router", default="teal")
    p.add_argument("--shape", default="576x1536", help="HIDDENxD_FF")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--active", type=float, default=0.5)
    p.add_argument("--busy-blocks", type=int, default=300, help="turns of 8 calls each with one busy process")
    p.add_argument("--idle-blocks", type=int, default=300, help="turns of 8 calls each after it stopped")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    hidden, d_ff = (int(v) for v in a.shape.split("x"))
    dtype = parse_dtype(a.dtype)
    layers = ffns(random_ffn_model(hidden, d_ff, dtype, "cpu", layers_for(hidden, d_ff, dtype, "cpu")))
    g = torch.Generator().manual_seed(0)
    assignment = torch.randperm(d_ff, generator=g) % 64
    routed = [routed_ffn(f, a.router, a.active, assignment) for f in layers]
    dense = [f.module for f in layers]
    xs = [torch.randn(a.batch, 1, hidden, generator=g).to(dtype) for _ in range(INPUTS)]
    key = routed[0].timing_key(xs[0].reshape(-1, hidden))
    calls = []  # per routed call: its path, its seconds, the chooser's best path after it

    def phase(blocks: int) -> dict:
        dense_seconds, first = [], len(calls)
        for i in range(blocks):
            for copies, timed in ((dense, dense_seconds), (routed, None)):
                for j in range(i * BLOCK, (i + 1) * BLOCK):
                    t = time.perf_counter()
                    copies[j % len(copies)](xs[j % len(xs)])
                    if timed is not None:
                        timed.append(time.perf_counter() - t)
        mine = calls[first:]
        routed_mean = sum(c["seconds"] for c in mine) / len(mine)
        return {"best_at_end": CHOOSER.best(key), "routed_mean_ms": round(1e3 * routed_mean, 3),
                "dense_mean_ms": round(1e3 * sum(dense_seconds) / len(dense_seconds), 3),
                "expected_ms": {q: round(1e3 * s, 3) for q, s in CHOOSER.timings[key].seconds.items()}}

    record = CHOOSER.record

    def traced(k, path, seconds):  # this process's chooser only: a probe, not a change of how paths are chosen
        record(k, path, seconds)
        if k == key:
            calls.append({"path": path, "seconds": seconds, "best": CHOOSER.best(k)})

    CHOOSER.record = traced
    with torch.no_grad():
        with competing_processes(1):
            busy = phase(a.busy_blocks)
        start = len(calls)
        idle = phase(a.idle_blocks)
    back = next((n for n, c in enumerate(calls[start:]) if not c["best"].endswith(SERIAL)), None)
    idle["routed_calls_until_all_threads"] = back
    idle_calls = calls[start:]
    tail = idle_calls[len(idle_calls) // 2:]
    idle["routed_mean_last_half_ms"] = round(1e3 * sum(c["seconds"] for c in tail) / len(tail), 3)
    for name, ph in (("busy", busy), ("idle", idle)):
        print(f"{name}: best {ph['best_at_end']}, routed mean {ph['routed_mean_ms']} ms, dense mean "
              f"{ph['dense_mean_ms']} ms, expected {ph['expected_ms']}")
    on_one = sum(c["path"].endswith(SERIAL) for c in idle_calls) / len(idle_calls)
    print(f"idle: {back} of {len(idle_calls)} routed calls before the best path ran on all threads, {on_one:.2f} of "
          f"them on one thread; routed mean of the last half {idle['routed_mean_last_half_ms']} ms")
    save(a.json, {"args": vars(a), "torch_threads": torch.get_num_threads(), "busy": busy, "idle": idle,
                  "paths_taken_idle": [c["path"] for c in idle_calls]})


if __name__ == "__main__":
    main()

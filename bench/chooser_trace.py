"""Probe: every call the path chooser times in one cell of `bench_ffn.py`, and what it expected of each path.

`bench_ffn.py` reports a cell's chosen path and the median and mean of its timed calls; this shows how the
chooser (`bricks/routing/paths.py`) got there: each timed call in order (warm-up included), its path and time,
and per path the median, mean and longest call beside the chooser's expected time at the end (the mean of its
recent timings, less a lone stall: `expected_seconds`). Before WINDOW = 16 and the lone-stall rule, the chooser
left out the slowest of 8 timings, and a path whose stalls were rare but long looked as fast as its calls between
them (the file of this command at 3110b54 or before, in git history).

    python bench/chooser_trace.py --router teal --dense-fallback --shape 576x1536 --dtype float32 --batch 32 \\
        --active 0.5 --busy 1 --json bench/results/chooser_trace_teal_fallback_busy_cpu.json
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from bricks.routing.bench import bench_ffn
from bricks.routing.paths import CHOOSER
from record import save


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--router", default="teal")
    p.add_argument("--shape", default="576x1536", help="HIDDENxD_FF")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--active", type=float, default=0.5)
    p.add_argument("--busy", type=int, default=1)
    p.add_argument("--dense-fallback", action="store_true")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    calls = []
    record = CHOOSER.record

    def traced(key, path, seconds):  # the chooser's own record, then what it now expects of every path
        record(key, path, seconds)
        calls.append({"path": path, "ms": round(1e3 * seconds, 3),
                      "expected_ms": {q: round(1e3 * s, 3) for q, s in CHOOSER.timings[key].seconds.items()}})

    CHOOSER.record = traced  # this process's chooser only: a probe, not a change of how paths are chosen
    hidden, d_ff = (int(v) for v in a.shape.split("x"))
    [row] = bench_ffn(shapes=((hidden, d_ff),), dtypes=(a.dtype,), batches=(a.batch,), actives=(a.active,),
                      router=a.router, reps=a.reps, busy=a.busy, dense_fallback=a.dense_fallback, progress=print)
    times = defaultdict(list)
    for c in calls:
        times[c["path"]].append(c["ms"])
    paths = {}
    for path, ms in times.items():
        ms_sorted = sorted(ms)
        paths[path] = {"calls": len(ms), "median_ms": ms_sorted[len(ms) // 2], "mean_ms": round(sum(ms) / len(ms), 3),
                       "max_ms": ms_sorted[-1], "expected_ms": calls[-1]["expected_ms"].get(path)}
        print(f"{path:>10}: {len(ms):3d} calls, median {paths[path]['median_ms']:.2f} ms, mean {paths[path]['mean_ms']:.2f} ms, "
              f"longest {paths[path]['max_ms']:.1f} ms; the chooser expected {paths[path]['expected_ms']} ms")
    save(a.json, {"args": vars(a), "row": row, "paths": paths, "calls": calls})


if __name__ == "__main__":
    main()

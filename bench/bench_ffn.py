"""Benchmark: one FFN call, dense vs routed (teal or brick routers), on an idle machine and beside busy processes.

The same measurement as `bricks bench ffn` (random weights, decode-style inputs, copies of the FFN as in a
model, dense and routed in turns in the same run, the median and the mean of the timed calls), repeated for each
--busy count of competing processes, with the results file recording the command and the machine. Each row names the execution path the routed FFN's
timings chose and the compute fraction it executed. On CUDA every call is timed as replays of a captured
CUDA graph, dense and routed alike (`--device cuda --busy 0`).

    python bench/bench_ffn.py --router teal --busy 0 --busy 1 --json bench/results/ffn_teal_cpu.json
"""

from __future__ import annotations

import argparse

from bricks.routing.bench import bench_ffn
from record import save


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--router", default="teal")
    p.add_argument("--shape", action="append", default=None, help="HIDDENxD_FF (default: 576x1536 and 4096x11008)")
    p.add_argument("--dtype", action="append", default=None, help="default: float32 and bfloat16")
    p.add_argument("--batch", action="append", type=int, default=None, help="default: 1, 8 and 32")
    p.add_argument("--active", action="append", type=float, default=None, help="default: 0.5 and 0.25")
    p.add_argument("--busy", action="append", type=int, default=None, help="competing busy processes (default: 0, 1)")
    p.add_argument("--dense-fallback", action="store_true", help="let routed FFNs run densely where that is faster")
    p.add_argument("--selection", default="topk", choices=("topk", "threshold"), help="teal's")
    p.add_argument("--path", action="append", default=None, help="fix the routed FFN's execution path, repeatable: "
                   "rows for each (default: timed on CPU, static on accelerators)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in (a.shape or ["576x1536", "4096x11008"])]
    rows = []
    for busy in a.busy or [0, 1]:
        for path in a.path or [None]:
            rows += bench_ffn(shapes, a.dtype or ["float32", "bfloat16"], a.batch or [1, 8, 32], a.active or [0.5, 0.25],
                              router=a.router, reps=a.reps, device=a.device, busy=busy,
                              dense_fallback=a.dense_fallback, selection=a.selection, path=path,
                              progress=lambda line, busy=busy: print(f"busy {busy}: {line}", flush=True))
    for stat in ("speedup", "speedup_mean"):
        worst = min(rows, key=lambda r: r[stat])
        print(f"slowest setting by {stat}: x{worst[stat]:.2f} dense ({worst['hidden']}x{worst['d_ff']} {worst['dtype']} "
              f"batch {worst['batch']} at {worst['active']}, {worst['busy_processes']} busy, path {worst['path']})")
    save(a.json, {"args": vars(a), "rows": rows}, device=a.device)


if __name__ == "__main__":
    main()

"""Probe: what a call on one thread does to the next call on two, with another process busy on the CPU.

Why `bench_ffn.py` times dense and routed FFNs in turns of several calls rather than call by call: torch's other
thread sleeps while a call runs on one thread (an `@1` path), and with a busy process on the other core the next
call on two threads can wait for it to wake. This times the dense FFN's calls back to back, and between calls of
each kind of neighbour: a call of the same FFN on two threads, and stretches of --gap-ms spent on one thread
(Python spinning, torch untouched; a one-thread routed call of the 576x1536 bf16 FFN at 32 tokens takes about 2 ms).
Median and mean of each, in one results file.

    python bench/thread_wake.py --busy 1 --json bench/results/thread_wake_cpu.json
"""

from __future__ import annotations

import argparse
import time

import torch

from bricks.arch import ffns
from bricks.routing.bench import competing_processes, random_ffn_model
from record import save


def spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="576x1536", help="HIDDENxD_FF")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--busy", type=int, default=1)
    p.add_argument("--gap-ms", type=float, action="append", default=None, help="one-thread stretches to try "
                   "(default: 0.5, 1, 2, 4)")
    p.add_argument("--seconds", type=float, default=3.0, help="per neighbour and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    hidden, d_ff = (int(v) for v in a.shape.split("x"))
    dtype = getattr(torch, a.dtype)
    dense = ffns(random_ffn_model(hidden, d_ff, dtype))[0].module
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(a.batch, 1, hidden, generator=g).to(dtype) for _ in range(64)]
    with torch.no_grad():
        for x in xs:  # warm-up
            dense(x)
        neighbours = {"none (back to back)": None, "the same call on two threads": lambda x: dense(x)}
        for gap in a.gap_ms or [0.5, 1.0, 2.0, 4.0]:
            neighbours[f"{gap} ms on one thread"] = lambda x, gap=gap: spin(gap / 1e3)
        rows = []
        with competing_processes(a.busy):
            for r in range(a.rounds):
                for name, neighbour in neighbours.items():
                    times, start, i = [], time.perf_counter(), 0
                    while time.perf_counter() - start < a.seconds:
                        x = xs[i % len(xs)]
                        i += 1
                        t = time.perf_counter()
                        dense(x)
                        times.append(time.perf_counter() - t)
                        if neighbour is not None:
                            neighbour(x)
                    times.sort()
                    row = {"round": r, "neighbour": name, "calls": len(times),
                           "median_ms": round(1e3 * times[len(times) // 2], 3),
                           "mean_ms": round(1e3 * sum(times) / len(times), 3)}
                    rows.append(row)
                    print(f"round {r}, between calls of {name}: median {row['median_ms']:.3f} ms, mean {row['mean_ms']:.3f} ms "
                          f"({row['calls']} calls)", flush=True)
    save(a.json, {"args": vars(a), "rows": rows})


if __name__ == "__main__":
    main()

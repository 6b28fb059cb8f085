"""Probe: a routed model's greedy decode once another process stops being busy (`chooser_recovery.py`, end to end).

`chooser_recovery.py` times one FFN; in a model every FFN of one shape shares one timing key, so the chooser
(`bricks/routing/paths.py`) sees one layer's calls after another, with attention and the rest between them. This
decodes with the dense model and with teal's `SparseFFN`s at `--active`, in turns of one decode each (the first
of a turn alternating), first `--busy-rounds` turns with one busy process, then `--idle-rounds` without, and
reports per turn: tokens/s of each, the share of the decode calls' FFN calls on a one-thread path (`@1`), and the
chooser's best path after it; then how many turns of the idle phase passed before that best path ran on all
threads, and the tokens/s over the idle phase's last half.

    python bench/decode_recovery.py --json bench/results/decode_recovery_after1_zen4_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from bench_decode import random_llama
from bricks import load_model
from bricks.loading import parse_dtype
from bricks.routing import sparsified
from bricks.routing.bench import competing_processes
from bricks.routing.paths import CHOOSER, SERIAL
from bricks.routing.sparse_ffn import SparseFFN
from record import save


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="a model spec, or `random`: bench_decode.py's 22-layer Llama shape")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--active", type=float, default=0.5)
    p.add_argument("--tokens", type=int, default=32, help="new tokens per decode")
    p.add_argument("--busy-rounds", type=int, default=12, help="turns with one busy process")
    p.add_argument("--idle-rounds", type=int, default=12, help="turns after it stopped")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    if a.model == "random":
        dense = random_llama(dtype=parse_dtype(a.dtype))
    else:
        dense, _ = load_model(a.model, dtype=a.dtype)
        dense.eval()
    routed = copy.deepcopy(dense)
    ids = torch.randint(0, dense.config.vocab_size, (1, 16))
    calls = []  # the path of each decode-step FFN call

    def decode(model) -> float:
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False)
        assert out.shape[1] == ids.shape[1] + a.tokens
        return a.tokens / (time.perf_counter() - t)

    with torch.no_grad(), sparsified(routed, a.active):
        ffn = next(m for m in routed.modules() if isinstance(m, SparseFFN))
        key = ffn.timing_key(torch.zeros(1, ffn.hidden, dtype=ffn.w_in_t.dtype))
        record = CHOOSER.record

        def traced(k, path, seconds):  # this process's chooser only: a probe, not a change of how paths are chosen
            record(k, path, seconds)
            if k == key:
                calls.append(path)

        CHOOSER.record = traced
        rounds = []

        def turns(n: int, phase: str) -> None:
            for i in range(n):
                first = len(calls)
                speed = {}
                for which in (("dense", "routed") if len(rounds) % 2 == 0 else ("routed", "dense")):
                    speed[which] = decode(dense if which == "dense" else routed)
                mine = calls[first:]
                rounds.append({"phase": phase, "dense_tokens_per_s": round(speed["dense"], 3),
                               "routed_tokens_per_s": round(speed["routed"], 3),
                               "on_one_thread": round(sum(c.endswith(SERIAL) for c in mine) / max(1, len(mine)), 3),
                               "best": CHOOSER.best(key)})
                r = rounds[-1]
                print(f"{phase} {i}: dense {r['dense_tokens_per_s']} routed {r['routed_tokens_per_s']} tokens/s, "
                      f"{r['on_one_thread']:.2f} of the FFN calls on @1, best {r['best']}", flush=True)

        with competing_processes(1):
            turns(a.busy_rounds, "busy")
        turns(a.idle_rounds, "idle")
    idle = [r for r in rounds if r["phase"] == "idle"]
    back = next((n for n, r in enumerate(idle) if not r["best"].endswith(SERIAL)), None)
    tail = idle[len(idle) // 2:]

    def mean(rows, field):
        return round(sum(r[field] for r in rows) / len(rows), 3)

    summary = {"idle_rounds_until_all_threads": back, "best_at_end": idle[-1]["best"],
               "idle_last_half": {f: mean(tail, f) for f in ("dense_tokens_per_s", "routed_tokens_per_s", "on_one_thread")},
               "busy": {f: mean(rounds[:a.busy_rounds], f) for f in ("dense_tokens_per_s", "routed_tokens_per_s",
                                                                     "on_one_thread")}}
    print(summary)
    save(a.json, {"args": vars(a), "torch_threads": torch.get_num_threads(), "key": [str(v) for v in key],
                  **summary, "rounds": rounds})


if __name__ == "__main__":
    main()

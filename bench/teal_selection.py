"""Benchmark: teal's two selections on a real model, top-k per token and calibrated thresholds (TEAL's choice).

Held-out perplexity ratio to the dense model per domain, the routed compute
fraction (what the tokens selected: exact under top-k, a mean under
thresholds), and the tokens/s of evaluating batches of full windows, dense and
routed in the same run. Thresholds are calibrated on the train split; nothing
is tuned on the held-out windows. One more top-k row runs with the input
embeddings scaled by (1 + 1e-6): how far float rounding alone moves a routed
model's perplexity (a per-token top-k turns a rounding difference into a
different choice at the boundary, layer after layer), the noise floor of
every comparison here.

    python bench/teal_selection.py [--compute 0.5] [--model default] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json

import torch

import bricks
from bricks.routing import calibrate_thresholds, sparsified
from record import save

DATA = ["code=builtin:code", "math=builtin:math", "prose=builtin:prose"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--compute", type=float, action="append", default=None, help="default: 0.5")
    p.add_argument("--windows", type=int, default=8, help="held-out windows per domain")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--calibration-windows", type=int, default=32, help="train windows per domain")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.manual_seed(0)
    model, tok = bricks.load_model(a.model)
    heldout = bricks.load_domains(DATA, tok, "heldout", a.seq_len, a.windows)
    calibration = torch.cat([d.windows for d in bricks.load_domains(DATA, tok, "train", 128, a.calibration_windows)])
    with torch.no_grad():
        dense = bricks.evaluate(model, heldout, a.batch_size)
        rows = {"dense": dense}
        for compute in a.compute or [0.5]:
            with sparsified(model, compute):
                rows[f"topk @ {compute:g}"] = bricks.evaluate(model, heldout, a.batch_size)
                nudge = model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * (1 + 1e-6))
                try:
                    rows[f"topk @ {compute:g}, embeddings x(1+1e-6)"] = bricks.evaluate(model, heldout, a.batch_size)
                finally:
                    nudge.remove()
                thresholds = calibrate_thresholds(model, calibration)
                rows[f"threshold @ {compute:g}"] = {**bricks.evaluate(model, heldout, a.batch_size),
                                                    "thresholds": thresholds}
    for name, r in rows.items():
        r["ratio"] = {d: r["ppl"][d] / dense["ppl"][d] for d in dense["ppl"]}
        r["tokens_per_s_over_dense"] = r["tokens_per_s"] / dense["tokens_per_s"]
        print(f"{name:>36}: ratio {' / '.join(f'{v:.3f}' for v in r['ratio'].values())}, compute {r['compute_fraction']:.3f}"
              f" (executed {r['executed_fraction']:.3f}), eval tokens/s x{r['tokens_per_s_over_dense']:.2f}", flush=True)
    save(a.json, {"args": vars(a), "rows": rows}, model)
    print(json.dumps({k: round(v["tokens_per_s_over_dense"], 3) for k, v in rows.items()}))


if __name__ == "__main__":
    main()

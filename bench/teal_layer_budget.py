"""Probe: does teal gain from giving each layer its own compute fraction? On the default model, no training.

1. Sensitivity: every layer alone runs at `--probe-compute` (the others dense);
   the mean PPL ratio minus 1 on the validation split is that layer's
   sensitivity (the budgets below are tuned on it).
2. At each target, the same mean compute spread three ways (the printed
   compute is what the layers run, counts rounded down):
   - uniform (what `moefy --router teal` does);
   - the first layer dense, the others even;
   - shares proportional to sensitivity ** 0.5, each clipped to [0.1, 1];
   each scored on the held-out split (and on validation, for comparison).

    python bench/teal_layer_budget.py [--windows 4] [--json out.json]
"""

from __future__ import annotations

import argparse

import bricks
from bricks.analysis.sparsity import perplexity
from bricks.routing import SparseFFN, compute_fraction
from record import save

DATA = ["code=builtin:code", "math=builtin:math", "prose=builtin:prose"]


def spread(weights: list[float], target: float, lo: float = 0.1) -> list[float]:
    """Per-layer fractions proportional to `weights`, clipped to [lo, 1], with mean `target` (bisection on the scale)."""
    mean_w = sum(weights) / len(weights)
    a, b = 0.0, 1.0 / min(weights) * mean_w
    for _ in range(60):
        k = (a + b) / 2
        shares = [min(1.0, max(lo, target * k * w / mean_w)) for w in weights]
        a, b = (k, b) if sum(shares) / len(shares) < target else (a, k)
    return shares


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4, help="validation and held-out windows of 256 tokens per domain")
    p.add_argument("--probe-compute", type=float, default=0.2, help="compute of the one sparse layer when measuring sensitivity")
    p.add_argument("--targets", default="0.5,0.3")
    p.add_argument("--json")
    args = p.parse_args()

    model, tok = bricks.load_model("default")
    splits = {s: bricks.load_domains(DATA, tok, s, 256, args.windows) for s in ("validation", "heldout")}
    dense = {s: [perplexity(model, d.windows) for d in doms] for s, doms in splits.items()}
    bricks.moefy(model, None, router="teal", compute=1.0)
    layers = [m for m in model.modules() if isinstance(m, SparseFFN)]

    def ratios(split: str) -> list[float]:
        return [perplexity(model, d.windows) / ref for d, ref in zip(splits[split], dense[split])]

    names = [d.name for d in splits["heldout"]]
    res = {"args": vars(args), "dense_ppl": {s: dict(zip(names, v)) for s, v in dense.items()}, "layers": [], "rows": []}
    for i, m in enumerate(layers):
        m.set_compute(args.probe_compute)
        r = ratios("validation")
        m.set_full()
        res["layers"].append({"layer": i, "ratio": r, "sensitivity": sum(r) / len(r) - 1})
        print(f"layer {i:2d} alone at {args.probe_compute}: validation ratio " + " / ".join(f"{x:.3f}" for x in r), flush=True)
    sens = [max(x["sensitivity"], 1e-4) for x in res["layers"]]

    n = len(layers)
    for target in (float(t) for t in args.targets.split(",")):
        rest = (target * n - 1) / (n - 1)
        for name, shares in ((f"uniform {target}", [target] * n),
                             (f"first layer dense, others {rest:.3f}", [1.0] + [rest] * (n - 1)),
                             ("sensitivity ** 0.5", spread([s ** 0.5 for s in sens], target))):
            for m, c in zip(layers, shares):
                m.set_compute(c)
            r, v = ratios("heldout"), ratios("validation")
            res["rows"].append({"target": target, "rule": name, "compute": compute_fraction(model), "ratio": r,
                                "ratio_validation": v, "shares": shares})
            print(f"{target}: {name:<34} compute {compute_fraction(model):.4f}  held-out ratio "
                  + " / ".join(f"{x:.3f}" for x in r), flush=True)
    save(args.json, res, model)


if __name__ == "__main__":
    main()

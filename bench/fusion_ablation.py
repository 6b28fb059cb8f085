"""Fused specialists against what a user would try first, and the two training choices UltraFuser makes.

One run on the held-out split of every domain (code, math, prose by default):
each specialist alone, their uniform logit average, their linear and TIES
merges (ΔW space), and fused models trained three ways from the same
specialists and data:

- two-stage, balanced batches (the paper's recipe: gate alone, then gate and
  specialists' LoRA factors);
- direct joint training (gate and factors from the start), balanced;
- two-stage with proportional batches.

Beside them, `bricks route --router gate`: a token-level gate over the three
frozen bricks inside one model (X-LoRA style). Every fused model is also scored
on the validation split, and the one with the best validation mixed perplexity
is named `selected`: the held-out figures of that one are the claim, chosen
without looking at held-out text.

Specialists: `--adapter NAME=DIR` (bricks or PEFT dirs on `--model`), or, if
none are given, LoRA adapters trained here on each domain's train split.

    python bench/fusion_ablation.py [--adapter code=DIR ...] [--stage1 100] [--stage2 100] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import copy
import math
import time


import bricks
from bricks.adapters import AdapterBrick, attach_adapters, train_lora
from bricks.adapters.routers import compare_routing, fit_router
from bricks.fusion import AdapterSpecialists, FusedModel, compare_fusion, gate_shares, train_fusion
from bricks.merge import merge_adapters
from record import save

DATA = ["code=builtin:code", "math=builtin:math", "prose=builtin:prose"]
RUNS = ("two-stage balanced", "direct joint balanced", "two-stage proportional")


def merged_ppl(model, brick, domains) -> dict:
    multi = attach_adapters(model, [brick])
    try:
        with multi.use(weights=[[1.0]]):
            per = {d.name: bricks.perplexity(model, d.windows) for d in domains}
    finally:
        multi.detach()
    n = [d.windows.shape[0] * (d.windows.shape[1] - 1) for d in domains]
    per["mixed"] = math.exp(sum(k * math.log(per[d.name]) for k, d in zip(n, domains)) / sum(n))
    return per


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default")
    p.add_argument("--adapter", action="append", default=[], help="NAME=DIR, one per domain, named like it")
    p.add_argument("--data", action="append", default=None)
    p.add_argument("--train-steps", type=int, default=150, help="LoRA training steps when no adapters are given")
    p.add_argument("--stage1", type=int, default=100)
    p.add_argument("--stage2", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--stage2-lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=6)
    p.add_argument("--windows", type=int, default=128)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--gate-steps", type=int, default=30, help="training steps of the `route --router gate` row (0: no row)")
    p.add_argument("--run", action="append", default=None, choices=RUNS,
                   help="train only these fused models (repeatable; default: all three)")
    p.add_argument("--json")
    a = p.parse_args()
    start = time.perf_counter()
    data = a.data or DATA
    base, tok = bricks.load_model(a.model)
    train = bricks.load_domains(data, tok, "train", a.seq_len, a.windows)
    heldout = bricks.load_domains(data, tok, "heldout", a.seq_len, a.eval_windows)
    validation = bricks.load_domains(data, tok, "validation", a.seq_len, a.eval_windows)
    specialists = []
    for spec in a.adapter:
        name, path = spec.split("=", 1)
        brick = AdapterBrick.load(path)
        brick.name = name
        specialists.append(brick)
    if not specialists:
        for d in train:
            brick, rep = train_lora(base, d.windows, d.name, rank=16, steps=a.train_steps, lr=2e-3, batch_size=4, log=print)
            specialists.append(brick)
    res = {"args": vars(a), "ppl": {}, "gate_shares": {}, "training": {}, "validation_mixed": {}}
    res["ppl"]["linear merge"] = merged_ppl(base, merge_adapters(specialists, method="linear")[0], heldout)
    res["ppl"]["TIES merge"] = merged_ppl(base, merge_adapters(specialists, method="ties", model_params=[{"density": 0.5}] * len(specialists))[0], heldout)
    if a.gate_steps:
        multi = attach_adapters(base, specialists)
        try:
            router = fit_router(multi, "gate", train, steps=a.gate_steps, lr=1e-2, batch_size=4)
            res["ppl"]["route --router gate"] = compare_routing(router, heldout, baselines=False)["ppl"]["routed"]
        finally:
            multi.detach()
    runs = {"two-stage balanced": (a.stage1, a.stage2, True), "direct joint balanced": (0, a.stage1 + a.stage2, True),
            "two-stage proportional": (a.stage1, a.stage2, False)}
    for name, (s1, s2, balanced) in runs.items():
        if a.run and name not in a.run:
            continue
        fused = FusedModel(AdapterSpecialists(copy.deepcopy(base), copy.deepcopy(specialists)))
        res["training"][name] = train_fusion(fused, train, s1, s2, a.lr, a.stage2_lr, a.batch_size, balanced, log=print)
        ppl = compare_fusion(fused, heldout)
        res["ppl"][name] = ppl.pop("fused")
        res["ppl"].update({k: v for k, v in ppl.items() if k not in res["ppl"]})  # specialists, uniform (first run)
        res["gate_shares"][name] = gate_shares(fused, heldout)
        res["validation_mixed"][name] = compare_fusion(fused, validation)["fused"]["mixed"]
        print(name, {k: round(v, 3) for k, v in res["ppl"][name].items()}, flush=True)
    cols = list(next(iter(res["ppl"].values())))
    print(f"{'':>24}" + "".join(f"{c:>10}" for c in cols))
    for setting, row in res["ppl"].items():
        print(f"{setting:>24}" + "".join(f"{row[c]:>10.3f}" for c in cols))
    if res["validation_mixed"]:
        res["selected"] = min(res["validation_mixed"], key=res["validation_mixed"].get)
        print("selected on validation:", res["selected"], {k: round(v, 3) for k, v in res["validation_mixed"].items()})
    res["seconds"] = round(time.perf_counter() - start, 1)
    save(a.json, res, base)


if __name__ == "__main__":
    main()

"""Routed bricks with recovery training, on the default model, against the right dense baseline.

One run measures, on the held-out windows of every built-in domain:

1. the dense model as loaded;
2. the routed MoE (co-activation bricks with a shared brick, trained router,
   FFN compute target, per-layer budgets) before recovery;
3. the same MoE after `--steps` of recovery training (routers in the loop);
4. with `--objective lm` only: the dense model after the same fine-tune (same
   windows, order, steps and learning rate), the fair baseline, since
   in-domain fine-tuning alone lowers held-out perplexity. A `distill`
   recovery (the default) learns to match the dense model itself, so (1) is
   already its fair baseline.

It prints per-domain perplexities and the ratios of (3) to (1) (and to (4)),
with the FFN compute fraction actually executed.

    python bench/routing_recovery.py [--compute 0.5] [--steps 300] [--objective distill|lm] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

import bricks
from bricks.analysis.partition import activation_statistics
from bricks.routing.recovery import recover
from record import environment, save

DATA = ["code=builtin:code", "math=builtin:math", "prose=builtin:prose"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compute", type=float, default=0.5, help="FFN compute fraction target (router and shared brick included)")
    p.add_argument("--router", default="hybrid", help="a brick router, or teal (neuron-level magnitude sparsity)")
    p.add_argument("--budget", choices=["uniform", "sensitivity"], default="sensitivity")
    p.add_argument("--bricks", type=int, default=64)
    p.add_argument("--shared", type=float, default=0.0625)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--train-windows", type=int, default=1024, help="train windows per domain for recovery")
    p.add_argument("--windows", type=int, default=16, help="held-out windows per domain")
    p.add_argument("--objective", choices=["distill", "lm"], default="distill", help="recovery objective")
    p.add_argument("--partition", default="coactivation", help="partition method of the bricks")
    p.add_argument("--no-baseline", action="store_true", help="skip the fine-tuned dense baseline (lm objective)")
    p.add_argument("--refit-routers", choices=["off", "on", "both"], default="off",
                   help="MLP routers keep learning during recovery; both: one recovery each way from the same routed model")
    p.add_argument("--router-lr", type=float, default=1e-3, help="router learning rate with --refit-routers")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu)")
    p.add_argument("--checkpoint", help="save the recovery state here every 50 steps; rerunning the same command resumes")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.checkpoint and args.refit_routers == "both":
        p.error("--checkpoint resumes one recovery: use --refit-routers on or off")
    if args.router == "teal":  # the brick settings do not apply: record them as unused
        args.budget = args.bricks = args.shared = args.partition = None

    t0 = time.time()
    torch.manual_seed(0)
    model, tok = bricks.load_model("default", device=args.device)
    heldout = bricks.load_domains(DATA, tok, "heldout", args.seq_len, args.windows)
    recovery = torch.cat([d.windows for d in bricks.load_domains(DATA, tok, "train", args.seq_len, args.train_windows)])
    print(f"recovery data: {len(recovery)} windows of {args.seq_len} tokens; {args.steps} steps of {args.batch_size}")
    res = {"args": vars(args), "env": environment(model), "dense": bricks.evaluate(model, heldout)}
    print("dense:", {k: round(v, 3) for k, v in res["dense"]["ppl"].items()})

    if args.router == "teal":  # single neurons and input channels, chosen by magnitude: no BrickSet, no training
        bricks.moefy(model, None, router="teal", compute=args.compute)
    else:
        stats = activation_statistics(model, tok, DATA, windows=32, seq_len=128)
        bs = bricks.partition(model, args.partition, args.bricks, stats, shared_fraction=args.shared)
        router_data = bricks.load_domains(DATA, tok, "train", 128, 32)
        bricks.moefy(model, bs, router=args.router, active=0.5, train_domains=router_data, epochs=8,
                     compute=args.compute, budget=args.budget)
    res["routed"] = bricks.evaluate(model, heldout)
    print(f"setup took {time.time() - t0:.0f} s")
    print(f"routed before recovery (compute {res['routed']['compute_fraction']:.3f}):",
          {k: round(v / res["dense"]["ppl"][k], 3) for k, v in res["routed"]["ppl"].items()})
    refit = {"off": [False], "on": [True], "both": [False, True]}[args.refit_routers]
    routed = copy.deepcopy(model) if len(refit) > 1 else None
    for i, on in enumerate(refit):
        if i:
            model = routed
        key = "recovered_refit" if on and len(refit) > 1 else "recovered"
        t = time.time()
        report = recover(model, recovery, steps=args.steps, lr=args.lr, batch_size=args.batch_size, log=print,
                         objective=args.objective, refit_routers=on, router_lr=args.router_lr, checkpoint=args.checkpoint)
        report["seconds"] = time.time() - t
        res[key.replace("recovered", "recovery")] = report
        res[key] = bricks.evaluate(model, heldout)
        print(f"{key} (router refit {'on' if on else 'off'}, {report['seconds']:.0f} s):",
              {k: round(v / res["dense"]["ppl"][k], 3) for k, v in res[key]["ppl"].items()})
    del model, routed

    if args.objective == "lm" and not args.no_baseline:
        dense, _ = bricks.load_model("default", device=args.device)
        res["dense_tuned_recovery"] = recover(dense, recovery, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                                              objective="lm")
        res["dense_tuned"] = bricks.evaluate(dense, heldout)

    print(f"\n{'domain':>8} {'dense':>8} {'routed':>8} {'recovered':>10} {'dense+ft':>9} {'rec/dense':>10} {'rec/dense+ft':>13}")
    res["ratio"], res["ratio_fair"] = {}, {}
    for d in res["dense"]["ppl"]:
        dense_ppl, rec = res["dense"]["ppl"][d], res["recovered"]["ppl"][d]
        tuned = res.get("dense_tuned", {}).get("ppl", {}).get(d)
        res["ratio"][d] = rec / dense_ppl
        res["ratio_fair"][d] = rec / tuned if tuned else None
        print(f"{d:>8} {dense_ppl:8.3f} {res['routed']['ppl'][d]:8.3f} {rec:10.3f} "
              f"{tuned if tuned else float('nan'):9.3f} {res['ratio'][d]:10.3f} "
              f"{res['ratio_fair'][d] if tuned else float('nan'):13.3f}")
    if "recovered_refit" in res:
        res["ratio_refit"] = {d: res["recovered_refit"]["ppl"][d] / res["dense"]["ppl"][d] for d in res["dense"]["ppl"]}
        print("with router refit, rec/dense:", {d: round(v, 3) for d, v in res["ratio_refit"].items()})
    print(f"FFN compute fraction executed: {res['recovered']['compute_fraction']:.3f}; "
          f"run took {time.time() - t0:.0f} s (recovery {res['recovery']['seconds']:.0f} s)")
    save(args.json, res)
    if args.checkpoint:
        os.remove(args.checkpoint)  # the run is complete: its training state is not needed any more


if __name__ == "__main__":
    main()

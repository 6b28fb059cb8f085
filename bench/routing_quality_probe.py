"""Probe for routed bricks: how much quality each way of choosing neurons keeps, on the default model.

Quality only: the FFN is computed densely and the unchosen neurons are zeroed
(a masked path, for analysis), so the figures show which selection rules can
meet a quality target before any fast execution path is built (the `SparseFFN`
rows run the shipped module itself, as a check on the masked TEAL rows). Printed per
rule: FFN compute fraction (selection cost included where the rule has one)
and per-domain perplexity ratio to the dense model, on the validation split
(where a rule would be chosen) and on the held-out split (what is reported).
The TEAL input/neuron split is chosen on validation and its held-out figures
are printed last.

    python bench/routing_quality_probe.py [--windows 8] [--json out.json]
"""

from __future__ import annotations

import argparse

import torch

import bricks
from bricks.analysis.partition import activation_statistics
from bricks.analysis.sparsity import perplexity
from bricks.arch import ffns
from bricks.routing import routed_layers, sparsified
from record import save

DATA = ["code=builtin:code", "math=builtin:math", "prose=builtin:prose"]


def topk_mask(score: torch.Tensor, frac: float) -> torch.Tensor:
    """Keep the top `frac` entries of the last axis, per token."""
    k = max(1, round(frac * score.shape[-1]))
    idx = score.topk(k, dim=-1).indices
    return torch.zeros_like(score).scatter_(-1, idx, 1.0)


def neuron_oracle(frac, down_norms):
    return lambda i, a: a * topk_mask(a.abs() * down_norms[i], frac)


def brick_oracle(frac, assignments, shared, down_norms):
    """Top `frac` of routed bricks per token by true output mass; the shared brick always on."""
    def fn(i, a):
        assign = assignments[i]
        n = int(assign.max()) + 1
        mass = torch.zeros(*a.shape[:-1], n).index_add_(-1, assign, a.abs() * down_norms[i])
        routed = [b for b in range(n) if b != shared[i]]
        keep_b = torch.zeros_like(mass)
        keep_b[..., routed] = topk_mask(mass[..., routed], frac)
        if shared[i] is not None:
            keep_b[..., shared[i]] = 1.0
        return a * keep_b[..., assign]
    return fn


def cats(frac, model):
    """Neuron gating from the gate projection alone (CATS): |act(gate x)| decides."""
    blocks = ffns(model)
    gates = {}

    def pre(i, a):
        return a * topk_mask(gates[i], frac)

    def capture_gate(layer):
        def hook(module, args):
            gates[layer] = blocks[layer].act(args[0] @ blocks[layer].gate_weight().t()).abs()
        return hook
    return pre, [(b.module, capture_gate(b.layer)) for b in blocks]


def lowrank(frac, model, rank):
    """Deja Vu-style predictor: rank-r SVD of W_gate and W_up estimate |a| before computing it."""
    blocks = ffns(model)
    fac = []
    for b in blocks:
        parts = []
        for w in (b.gate_weight(), b.up_weight()):
            u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
            parts.append(((vh[:rank].t() * s[:rank]), u[:, :rank].t()))  # x @ A @ B ~ x @ w.T
        fac.append(parts)
    est = {}

    def capture(layer):
        def hook(module, args):
            x = args[0]
            (ga, gb), (ua, ub) = fac[layer]
            est[layer] = (blocks[layer].act((x @ ga) @ gb) * ((x @ ua) @ ub)).abs()
        return hook

    def pre(i, a):
        return a * topk_mask(est[i] * blocks[i].down_weight().norm(dim=0), frac)
    return pre, [(b.module, capture(b.layer)) for b in blocks]


def teal(frac_in, frac_act, model, weighted=False):
    """TEAL-style: keep the largest |x| input channels of gate/up and the largest |a| of down, per token.

    Unweighted is the rule of TEAL and of `SparseFFN` (`moefy --router teal`); `weighted` ranks neurons by |a| x
    the norm of their down column instead (the size of their output), a variant for comparison.
    """
    blocks = ffns(model)
    norms = [b.down_weight().detach().norm(dim=0) for b in blocks]

    def sparsify_input(module, args):
        x = args[0]
        return (x * topk_mask(x.abs(), frac_in), *args[1:])

    def pre(i, a):
        return a * topk_mask(a.abs() * norms[i] if weighted else a.abs(), frac_act)
    return pre, [(b.module, sparsify_input) for b in blocks]


def evaluate(model, heldout, hook, extra_hooks=()):
    handles = [m.register_forward_pre_hook(h) for m, h in extra_hooks]
    try:
        return [perplexity(model, d.windows, hook=hook) for d in heldout]
    finally:
        for h in handles:
            h.remove()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=8, help="held-out windows per domain")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", default=None)
    p.add_argument("--groups", default="neuron,bricks,cats,lowrank,teal", help="comma-separated rule groups to run")
    args = p.parse_args()
    model, tok = bricks.load_model("default")
    splits = {s: bricks.load_domains(DATA, tok, s, args.seq_len, args.windows) for s in ("validation", "heldout")}
    names = [x.name for x in splits["heldout"]]
    blocks = ffns(model)
    d, h = blocks[0].d_ff, blocks[0].down_weight().shape[0]
    down_norms = [b.down_weight().detach().norm(dim=0) for b in blocks]
    dense = {s: evaluate(model, doms, None) for s, doms in splits.items()}
    rows = []

    def record(name, compute, run):
        """`run(domains)`: the rule's perplexity per domain; measured on both splits."""
        row = {"rule": name, "compute": round(compute, 3)}
        for split, doms in splits.items():
            ratio = [p / q for p, q in zip(run(doms), dense[split])]
            row[f"ppl_ratio_{split}"] = dict(zip(names, [round(r, 3) for r in ratio]))
        rows.append(row)
        print(f"{name:<46} compute {compute:.3f}  held-out ppl ratio "
              + "  ".join(f"{n}={r:.3f}" for n, r in row["ppl_ratio_heldout"].items()), flush=True)

    groups = set(args.groups.split(","))
    if "neuron" in groups:
        for frac in (0.5, 0.3, 0.2):
            record(f"neuron oracle top {frac:.0%}", frac, lambda doms: evaluate(model, doms, neuron_oracle(frac, down_norms)))
    if "bricks" in groups:
        stats = activation_statistics(model, tok, DATA, windows=32, seq_len=128)
        for method in ("random", "param-kmeans", "coactivation", "functional"):
            for n, shared in ((64, 0.0), (64, 0.0625), (256, 0.0625)):
                bs = bricks.partition(model, method, n, stats, shared_fraction=shared)
                for frac in (0.5, 0.3):
                    # routed share chosen so that shared + routed neurons = frac of the FFN
                    routed = (frac - shared) / (1 - shared)
                    oracle = brick_oracle(routed, bs.assignments, bs.shared, down_norms)
                    record(f"brick oracle {method} {n}x{d // n}{' +shared 1/16' if shared else ''} {frac:.0%}", frac,
                           lambda doms: evaluate(model, doms, oracle))
    if "cats" in groups:
        for frac in (0.25, 0.1):
            pre, extra = cats(frac, model)
            record(f"CATS gate-only top {frac:.0%}", (1 + 2 * frac) / 3, lambda doms: evaluate(model, doms, pre, extra))
    if "lowrank" in groups:
        for rank in (32, 64):
            for frac in (0.4, 0.25):
                pre, extra = lowrank(frac, model, rank)
                cost = rank * (2 * h + 2 * d) / (3 * h * d)
                record(f"low-rank r={rank} predictor top {frac:.0%}", frac + cost, lambda doms: evaluate(model, doms, pre, extra))
    if "teal" in groups:
        for f_in, f_act in ((0.5, 0.5), (0.6, 0.3), (0.4, 0.7), (0.3, 0.3), (0.35, 0.2), (0.25, 0.4)):
            for weighted in (False, True):
                pre, extra = teal(f_in, f_act, model, weighted)
                record(f"TEAL inputs {f_in:.0%} / down {f_act:.0%}{' (|a| x down norm)' if weighted else ''}",
                       (2 * f_in + f_act) / 3, lambda doms: evaluate(model, doms, pre, extra))
        for compute in (0.5, 0.3):  # the shipped module (its own split and rounding), to check the rows above
            with sparsified(model, compute):
                fraction = max(m.compute_fraction() for m in routed_layers(model))
                record(f"SparseFFN (moefy --router teal) {compute}", fraction, lambda doms: evaluate(model, doms, None))
    chosen = None
    teal_rows = [r for r in rows if r["rule"].startswith("TEAL") and abs(r["compute"] - 0.5) < 0.02]
    if teal_rows:  # the split a user would pick at compute 0.5: the best worst-domain ratio on validation
        chosen = min(teal_rows, key=lambda r: max(r["ppl_ratio_validation"].values()))
        print(f"chosen on validation at compute 0.5: {chosen['rule']}; held-out ratio "
              + " / ".join(f"{v:.3f}" for v in chosen["ppl_ratio_heldout"].values()))
    save(args.json, {"args": vars(args), "dense_ppl": {s: dict(zip(names, v)) for s, v in dense.items()}, "rows": rows,
                     "chosen_on_validation": chosen}, model)


if __name__ == "__main__":
    main()

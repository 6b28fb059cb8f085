"""Per-layer budgets: how many bricks each layer runs, chosen by calibrated sensitivity.

A uniform active fraction treats all layers alike, but layers differ twice:
how much of their FFN output a budget of k bricks loses (their error curve,
which depends on how concentrated their activation mass is and on the
router), and how much the model's loss cares about that error (their
sensitivity). Both are measured on calibration tokens:

- error curve `err_l(k)`: mean relative error of layer l's FFN output when each
  token runs the router's k best bricks, for every k (one pass over the
  per-brick outputs, cumulated in the router's order);
- sensitivity `s_l`: loss increase when layer l alone runs at the uniform
  budget, divided by its squared error there (the loss of a trained model
  grows about quadratically with a small perturbation of a layer's output).

The budget is then spent greedily: starting from one brick per layer, each
step gives one more brick to the layer with the largest `s_l · Δ(err_l²)` per
multiply-accumulate, until the FFN compute target is reached.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BricksError
from ..runtime import run_model
from .bricked_ffn import BrickedFFN
from .router_training import training_data

POWER = 2  # loss ~ s · err^POWER near the uniform budget


@torch.no_grad()
def error_curve(ffn: BrickedFFN, x: torch.Tensor) -> torch.Tensor:
    """`[n_bricks + 1]`: mean relative FFN output error with the router's top-k bricks, k = 0..n."""
    n = ffn.n_bricks
    outs = torch.stack([ffn._brick_act(x, b) @ ffn.w_down[b] for b in range(n)], 1).float()  # [T, n, h]
    full = outs.sum(1)
    shared = ffn._shared(x)
    total = full + (shared.float() if shared is not None else 0.0)
    if ffn.b_down is not None:
        total = total + ffn.b_down.float()
    scores = ffn.router(x) if ffn.router is not None else outs.norm(dim=-1)
    if ffn.router is not None and ffn.router.reuses_gate:
        ffn.router.gate = None
    order = scores.float().argsort(dim=1, descending=True)
    ranked = outs.gather(1, order[..., None].expand_as(outs)).cumsum(1)  # [T, n, h]: output of the best k bricks
    missing = torch.cat([full[:, None], full[:, None] - ranked], 1)  # k = 0..n
    return (missing.norm(dim=-1) / total.norm(dim=-1, keepdim=True).clamp(min=1e-12)).mean(0)


def _mean_loss(model: nn.Module, ids: torch.Tensor, batch_size: int) -> float:
    total = 0.0
    for i in range(0, len(ids), batch_size):
        logits = run_model(model, ids[i : i + batch_size], logits=True).float()
        total += float(nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[i : i + batch_size, 1:].flatten().to(logits.device),
                                                   reduction="sum"))
    return total / (ids.shape[0] * (ids.shape[1] - 1))


@torch.no_grad()
def allocate_budgets(model: nn.Module, domains, compute: float, max_tokens: int = 1024, loss_windows: int = 8,
                     batch_size: int = 8) -> dict:
    """Set every bricked layer's active share so that the mean FFN compute fraction is `compute`.

    `model` must be bricked with its routers ready (trained or calibrated).
    Returns the per-layer report: sensitivity, error at the uniform budget,
    bricks per token chosen.
    """
    if not 0.0 < compute <= 1.0:
        raise BricksError(f"compute fraction must be in (0, 1], got {compute}")
    layers, data = training_data(model, domains, max_tokens, batch_size)
    if not layers:
        raise BricksError("the model has no bricked FFNs to budget: assemble bricks first (bricks.moefy)")
    for m in layers:
        m.set_compute(compute)  # the uniform budget: the reference point for sensitivity
    uniform = [m.k_active for m in layers]
    curves = [error_curve(m, x[: max(1, min(len(x), 2**26 // (m.n_bricks * m.hidden)))]) for m, (x, _) in zip(layers, data)]

    # Sensitivity: loss increase with one layer routed at the uniform budget, the others dense.
    ids = torch.cat([d.windows[:loss_windows] for d in domains])
    for m in layers:
        m.active = 1.0
    base = _mean_loss(model, ids, batch_size)
    sens = []
    for m, k, curve in zip(layers, uniform, curves):
        m.active = k / m.n_bricks
        rise = _mean_loss(model, ids, batch_size) - base
        m.active = 1.0
        sens.append(max(rise, 1e-6) / max(float(curve[k]) ** POWER, 1e-9))

    # Greedy: one brick at a time where it buys the most weighted error per MAC.
    ks = [1] * len(layers)
    budget = compute * sum(m.dense_macs_per_token() for m in layers)
    spent = sum(m._macs(1) for m in layers)
    if spent > budget:
        raise BricksError(f"a compute fraction of {compute} leaves no room for one routed brick per layer: raise it")
    while True:
        best, gain = None, 0.0
        for i, (m, curve) in enumerate(zip(layers, curves)):
            if ks[i] >= m.n_bricks:
                continue
            cost = m._macs(ks[i] + 1) - m._macs(ks[i])
            if spent + cost > budget:
                continue
            g = sens[i] * float(curve[ks[i]] ** POWER - curve[ks[i] + 1] ** POWER) / max(cost, 1)
            if best is None or g > gain:
                best, gain = i, g
        if best is None:
            break
        spent += layers[best]._macs(ks[best] + 1) - layers[best]._macs(ks[best])
        ks[best] += 1
    for m, k in zip(layers, ks):
        m.active = k / m.n_bricks
    return {"compute": compute, "layers": [
        {"layer": i, "sensitivity": round(s, 4), "uniform_bricks": u, "error_at_uniform": round(float(c[u]), 4), "bricks": k}
        for i, (s, u, c, k) in enumerate(zip(sens, uniform, curves, ks))]}

"""Fitting routers on data: the FFN inputs and oracle brick masses of calibration tokens, then each router's `fit`."""

from __future__ import annotations

import torch

from ..runtime import batches, run_model
from .bricked_ffn import BrickedFFN


@torch.no_grad()
def training_data(model, domains, max_tokens: int, batch_size: int):
    """Per bricked layer: FFN inputs [tokens, hidden] and oracle brick masses [tokens, n_bricks]."""
    layers = [m for m in model.modules() if isinstance(m, BrickedFFN)]
    xs: list[list[torch.Tensor]] = [[] for _ in layers]
    saved = [m.active for m in layers]
    ids = torch.cat([d.windows for d in domains])
    stride = max(1, ids.numel() // max_tokens)

    def keep(i):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[::stride]
            xs[i].append(x.detach())
        return hook

    handles = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(layers)]
    try:
        for m in layers:
            m.active = 1.0  # collect inputs of the dense computation, without routing
        for rows in batches(len(ids), batch_size, shard=False):
            run_model(model, ids[rows])
    finally:
        for h in handles:
            h.remove()
        for m, a in zip(layers, saved):
            m.active = a
    out = []
    for m, chunks in zip(layers, xs):
        x = torch.cat(chunks)
        mass = torch.cat([m.brick_mass(c) for c in x.split(1024)])
        out.append((x, mass))
    return layers, out


def train_routers(model, domains, epochs: int = 20, lr: float = 3e-3, max_tokens: int = 16384, batch_size: int = 8,
                  seed: int = 0) -> list[dict]:
    """Train or calibrate every trainable router of a bricked `model` on the train windows of `domains`.

    Each router is fitted on 9/10 of the captured tokens for its layer's budget
    (k bricks per token). Returns per layer, on the held-back tenth: the recall
    of the oracle's top-k bricks (`recall_at_k`) and the mean share of bricks
    the router selected (`active_share`; variable-count routers may differ from k/n).
    """
    layers, data = training_data(model, domains, max_tokens, batch_size)
    report = []
    g = torch.Generator().manual_seed(seed)
    for i, (m, (x, mass)) in enumerate(zip(layers, data)):
        if m.router is None or not m.router.trainable:
            continue
        k = min(m.k_active, m.n_bricks)
        perm = torch.randperm(len(x), generator=g)
        n_val = max(1, len(x) // 10)
        val, train = perm[:n_val], perm[n_val:]
        m.router.fit(x[train], mass[train], k, epochs, lr, g)
        with torch.no_grad():
            chosen = m.router.select(x[val], k)
            m.router.gate = None
            top = torch.zeros_like(chosen).scatter_(1, mass[val].topk(k, dim=1).indices, True)
            recall = float((chosen & top).sum() / (n_val * k))
            share = float(chosen.float().mean())
        report.append({"layer": i, "tokens": len(x), "recall_at_k": round(recall, 4), "active_share": round(share, 4)})
    return report

"""Routers: score each token's bricks so that a `BrickedFFN` runs only the best ones.

Registered by name in `ROUTERS`. A router maps hidden states `[tokens, hidden]`
to brick scores `[tokens, n_bricks]` (higher = more needed) and says what that
costs in multiply-accumulates per token, so that the compute fraction a bricked
FFN reports includes the router.

- `oracle`    the true activation mass of each brick (computes the whole FFN
              activation: for analysis, never faster than dense);
- `centroid`  similarity of the token to each brick's mean input weight vector
              (MoEfication's parameter-centroid selection), almost free;
- `mlp`       a small MLP trained on captured activations to predict each
              token's most active bricks (MoEfication's learned router).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..errors import BricksError

if TYPE_CHECKING:
    from .bricked_ffn import BrickedFFN


class Router(nn.Module):
    """Base class: `forward(x [tokens, hidden]) -> scores [tokens, n_bricks]`."""

    name = "router"
    trainable = False  # True when the router has learned parameters to save with the model

    def macs_per_token(self) -> int:
        """Multiply-accumulates per token spent on scoring."""
        raise NotImplementedError


class OracleRouter(Router):
    """Scores bricks by their true output mass sum_i |a_i|·||W_down[:, i]|| (computes all of `a`)."""

    name = "oracle"

    def __init__(self, ffn: "BrickedFFN"):
        super().__init__()
        self._ffn = [ffn]  # a list: do not register the FFN as a sub-module (it owns the router)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ffn[0].brick_mass(x)

    def macs_per_token(self) -> int:
        f = self._ffn[0]
        return f.w_in.shape[0] * f.w_in.shape[1] * f.w_in.shape[2]


class CentroidRouter(Router):
    """Scores bricks by x · c_b, c_b the mean of brick b's normalised input weight rows."""

    name = "centroid"

    def __init__(self, ffn: "BrickedFFN"):
        super().__init__()
        rows = ffn.w_in[:, : ffn.brick_size]  # [n, size, hidden]: gate rows (or up rows when not gated)
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        # Padding rows are zero and stay zero; average over the real neurons only.
        self.register_buffer("centroids", rows.sum(1) / ffn.sizes[:, None].to(rows.dtype))  # [n, hidden]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.centroids.t()

    def macs_per_token(self) -> int:
        return self.centroids.numel()


class MLPRouter(Router):
    """A small MLP trained on captured activations to predict which bricks matter (MoEfication).

    Trained by `train_routers` with a binary cross-entropy against the oracle's
    top-k bricks of each token; refuses to route before it has been trained.
    """

    name = "mlp"
    trainable = True

    def __init__(self, ffn: "BrickedFFN", width: int = 128):
        super().__init__()
        hidden, n = ffn.hidden, ffn.n_bricks
        dtype, dev = ffn.w_in.dtype, ffn.w_in.device
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, n)).to(dev, dtype)
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.trained):
            raise BricksError("the mlp router is untrained: train it on data first (bricks moefy ... --data NAME=SOURCE)")
        return self.net(x)

    def macs_per_token(self) -> int:
        return sum(m.weight.numel() for m in self.net if isinstance(m, nn.Linear))


ROUTERS: dict[str, Callable[..., Router]] = {"oracle": OracleRouter, "centroid": CentroidRouter, "mlp": MLPRouter}


def make_router(name: str, ffn) -> Router:
    if name not in ROUTERS:
        raise BricksError(f"unknown router {name!r}: choose from {', '.join(ROUTERS)}")
    return ROUTERS[name](ffn)


@torch.no_grad()
def _training_data(model, domains, max_tokens: int, batch_size: int):
    """Per bricked layer: FFN inputs [tokens, hidden] and oracle brick masses [tokens, n_bricks]."""
    from ..analysis.capture import batches, run_model
    from .bricked_ffn import BrickedFFN

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
    """Train every trainable router of a bricked `model` on the train windows of `domains`.

    Each router learns to put each token's oracle top-k bricks (k = its active
    count) above the others (binary cross-entropy). Returns per layer the
    recall of the oracle's top-k bricks on a held-back tenth of the tokens.
    """
    layers, data = _training_data(model, domains, max_tokens, batch_size)
    report = []
    g = torch.Generator().manual_seed(seed)
    for i, (m, (x, mass)) in enumerate(zip(layers, data)):
        if m.router is None or not m.router.trainable:
            continue
        k = min(m.k_active, m.n_bricks)
        labels = torch.zeros_like(mass).scatter_(1, mass.topk(k, dim=1).indices, 1.0)
        perm = torch.randperm(len(x), generator=g)
        n_val = max(1, len(x) // 10)
        val, train = perm[:n_val], perm[n_val:]
        net = m.router.net
        x32 = x.float()
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        net.float().train()
        with torch.enable_grad():
            for _ in range(epochs):
                for idx in train[torch.randperm(len(train), generator=g)].split(256):
                    loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x32[idx]), labels[idx].float())
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        net.to(m.w_in.dtype).eval()
        m.router.trained.fill_(True)
        with torch.no_grad():
            pred = m.router(x[val]).topk(k, dim=1).indices
            recall = float(labels[val].gather(1, pred).sum() / (len(val) * k))
        report.append({"layer": i, "tokens": len(x), "recall_at_k": round(recall, 4)})
    return report

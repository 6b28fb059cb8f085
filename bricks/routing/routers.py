"""Routers: score each token's bricks so that a `BrickedFFN` runs only the best ones.

Registered by name in `ROUTERS`. A router maps hidden states `[tokens, hidden]`
to brick scores `[tokens, n_bricks]` (higher = more needed) and says what that
costs in multiply-accumulates per token, so that the compute fraction a bricked
FFN reports includes the router.

- `oracle`    the true activation mass of each brick (computes the whole FFN
              activation: for analysis, never faster than dense);
- `centroid`  similarity of the token to each brick's mean input weight vector
              (MoEfication's parameter-centroid selection), almost free.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import BricksError


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
        f = self._ffn[0]
        a = f.brick_activations(x, None)  # [tokens, n_bricks, size]
        return (a.abs() * f.down_norms).sum(-1)

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


ROUTERS: dict[str, Callable[..., Router]] = {"oracle": OracleRouter, "centroid": CentroidRouter}


def make_router(name: str, ffn) -> Router:
    if name not in ROUTERS:
        raise BricksError(f"unknown router {name!r}: choose from {', '.join(ROUTERS)}")
    return ROUTERS[name](ffn)

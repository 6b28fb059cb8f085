"""Routers: choose, per token, the bricks a `BrickedFFN` runs.

Registered by name in `ROUTERS`. A router maps hidden states `[tokens, hidden]`
to brick scores `[tokens, n_bricks]` (higher = more needed), selects bricks from
them, and says what scoring costs in multiply-accumulates per token, so that
the compute fraction a bricked FFN reports includes the router.

- `oracle`    the true activation mass of each brick (computes the whole FFN
              activation: for analysis, never faster than dense; its cost is
              not counted, so its compute fraction is that of its bricks);
- `centroid`  similarity of the token to each brick's mean input weight vector
              (MoEfication's parameter-centroid selection), almost free;
- `mlp`       a small MLP trained on captured activations to predict each
              token's most active bricks (MoEfication's learned router);
- `threshold` neuron-level gating from the gate projection (CATS): a brick runs
              when the activation mass of its gate, sum_i |act(gate_i · x)|,
              passes a per-layer threshold calibrated to the target share; the
              number of bricks varies per token, and the gate rows computed for
              routing are reused by the bricks that run;
- `hybrid`    always-on shared neurons (the BrickSet's shared brick) plus
              routed bricks chosen by a trained MLP.

Routers that need data (`trainable`) are fitted by `train_routers` and refuse
to route before that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BricksError
from ..registry import Registry
from . import cpu_kernels

HALVES = (torch.bfloat16, torch.float16)  # where the centroid router scores in the compiled kernel on the CPU

# name -> Router class; each is built on the `BrickedFFN` it routes for (`make_router`)
ROUTERS: Registry = Registry("router")


class Router(nn.Module):
    """Base class: `forward(x [tokens, hidden]) -> scores [tokens, n_bricks]`; `select` keeps the top k."""

    name = "router"
    trainable = False  # True when the router is fitted on data and has state to save with the model
    reuses_gate = False  # True when routing computes the gate pre-activations (kept in `self.gate`)
    refits = False  # True when `refit_loss` can keep the router fitted during recovery
    exact_k = True  # every token runs exactly k bricks (False: the number varies per token)

    def macs_per_token(self) -> int:
        """Multiply-accumulates per token spent on scoring."""
        raise NotImplementedError

    def select(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Bool mask `[tokens, n_bricks]` of the bricks to run."""
        scores = self(x)
        if scores.device.type == "cpu" and scores.dtype != torch.float64 and cpu_kernels.available():
            return cpu_kernels.top_k_mask(scores.detach().contiguous(), k)  # one call: a decode step feels each op
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=-1).indices, True)

    def fit(self, x: torch.Tensor, mass: torch.Tensor, k: int, epochs: int, lr: float, generator: torch.Generator) -> None:
        """Fit on FFN inputs `x` and the oracle brick masses `mass` for a budget of k bricks per token."""

    def refresh(self) -> None:
        """Rebuild state derived from the FFN's weights after they changed (fitted state is kept)."""

    def refit_loss(self, x: torch.Tensor, mass: torch.Tensor, k: int) -> torch.Tensor:
        """Loss that keeps a trained router fitted to brick masses `mass` while the weights change (recovery);
        only routers with `refits` have one."""
        raise NotImplementedError(f"the {self.name} router has nothing to learn by gradient")


@ROUTERS.register("oracle", "the true brick activation mass (analysis only; its cost is not counted)")
class OracleRouter(Router):
    """Scores bricks by their true output mass sum_i |a_i|·||W_down[:, i]|| (computes all of `a`).

    An analysis device, the upper bound of what a router could choose: its own
    cost (the whole activation) is not counted, so the compute fraction it
    reports is that of the bricks it runs.
    """

    name = "oracle"

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self._ffn = [ffn]  # a list: do not register the FFN as a sub-module (it owns the router)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._ffn[0].brick_mass(x)

    def macs_per_token(self) -> int:
        return 0


@ROUTERS.register("centroid", "similarity to each brick's mean gate row (MoEfication's parameter centroids)")
class CentroidRouter(Router):
    """Scores bricks by x · c_b, c_b the mean of brick b's normalised input weight rows."""

    name = "centroid"

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self._ffn = [ffn]
        self.register_buffer("centroids", self._centroids())  # [n, hidden]

    @torch.no_grad()
    def _centroids(self) -> torch.Tensor:
        f = self._ffn[0]
        rows = f.w_in[:, : f.brick_size].detach()  # [n, size, hidden]: gate rows (or up rows when not gated)
        rows = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        # Padding rows are zero and stay zero; average over the real neurons only.
        return rows.sum(1) / f.sizes[:, None].to(rows.dtype)

    def refresh(self) -> None:
        self.centroids.copy_(self._centroids())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear, not `x @ centroids.t()`: the transposed matmul took longer in a probe of a bf16 call on the
        # CPU (bench/README.md, "Bricks' calls"), mostly fixed cost, as the product is small
        return F.linear(x, self.centroids)

    def select(self, x: torch.Tensor, k: int) -> torch.Tensor:
        c = self.centroids
        if x.dtype == c.dtype and x.dtype in HALVES:
            if x.device.type == "cpu" and cpu_kernels.available():
                # The scores and their top-k in one compiled call, summed in fp32 and ranked unrounded: torch's
                # small bf16 matmul alone cost a fifth of the small FFN's routed call at one token (bench/README.md,
                # "On an Intel Xeon with AMX"), and its bf16 scores tie often at the k-th. In fp32 torch's was as fast.
                return cpu_kernels.linear_top_k(x.detach().contiguous(), c, k)
            # Elsewhere (a GPU, a CPU without a compiler) the same ranking, of the half-precision products summed in
            # fp32: ranked after rounding to bf16, a few tokens in a hundred took other bricks than on the CPU.
            scores = F.linear(x.detach().float(), self._centroids_fp32())
            return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=-1).indices, True)
        return super().select(x, k)

    def _centroids_fp32(self) -> torch.Tensor:
        """The centroids in fp32, kept while they stay as they are (a decode step would convert them per layer)."""
        c = self.centroids
        key = (c.data_ptr(), c._version, c.device)
        cached = self.__dict__.get("_fp32")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_fp32"] = (key, c.float())
        return cached[1]

    def macs_per_token(self) -> int:
        return self.centroids.numel()


@ROUTERS.register("mlp", "a small MLP per layer trained to find each token's most active bricks (MoEfication)")
class MLPRouter(Router):
    """A small MLP trained on captured activations to predict which bricks matter (MoEfication).

    Trained with a binary cross-entropy against the oracle's top-k bricks of
    each token; refuses to route before it has been trained.
    """

    name = "mlp"
    trainable = True
    refits = True

    def __init__(self, ffn: nn.Module, width: int = 128):
        super().__init__()
        hidden, n = ffn.hidden, ffn.n_bricks
        dtype, dev = ffn.w_in.dtype, ffn.w_in.device
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Linear(width, n)).to(dev, dtype)
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.trained):
            raise BricksError(f"the {self.name} router is untrained: train it on data first (bricks moefy ... --data NAME=SOURCE)")
        return self.net(x)

    def macs_per_token(self) -> int:
        return sum(m.weight.numel() for m in self.net if isinstance(m, nn.Linear))

    @staticmethod
    def _labels(mass: torch.Tensor, k: int) -> torch.Tensor:
        return torch.zeros_like(mass, dtype=torch.float32).scatter_(1, mass.topk(k, dim=1).indices, 1.0)

    def refit_loss(self, x, mass, k):
        return nn.functional.binary_cross_entropy_with_logits(self.net(x).float(), self._labels(mass, k))

    def fit(self, x, mass, k, epochs, lr, generator):
        labels = self._labels(mass, k)
        dtype = self.net[0].weight.dtype
        x32 = x.float()
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.net.float().train()
        with torch.enable_grad():
            for _ in range(epochs):
                for idx in torch.randperm(len(x), generator=generator).split(256):
                    loss = nn.functional.binary_cross_entropy_with_logits(self.net(x32[idx]), labels[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        self.net.to(dtype).eval()
        self.trained.fill_(True)


@ROUTERS.register("hybrid", "the BrickSet's always-on shared brick plus MLP-routed bricks")
class HybridRouter(MLPRouter):
    """Shared always-on neurons plus MLP-routed bricks: the BrickSet must have a shared brick."""

    name = "hybrid"

    def __init__(self, ffn: nn.Module, width: int = 128):
        if ffn.shared_in is None:
            raise BricksError("the hybrid router needs a BrickSet with a shared brick: partition with --shared F (e.g. 0.0625)")
        super().__init__(ffn, width)


@ROUTERS.register("threshold", "CATS-style gating: bricks whose gate activation mass passes a calibrated threshold")
class ThresholdRouter(Router):
    """CATS-style gating: a brick runs when its gate activation mass passes a calibrated per-layer threshold.

    Calibration keeps quantiles of the scores on training tokens, so any
    target share (the FFN's active fraction) maps to a threshold without
    re-calibrating. Every token runs at least its best brick.
    """

    name = "threshold"
    trainable = True
    reuses_gate = True
    exact_k = False
    QUANTILES = 1025

    def __init__(self, ffn: nn.Module):
        super().__init__()
        self._ffn = [ffn]
        self.register_buffer("quantiles", torch.zeros(self.QUANTILES, device=ffn.w_in.device))
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool, device=ffn.w_in.device))
        self.gate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self._ffn[0]
        s = f.brick_size
        gate = torch.einsum("th,nsh->tns", x, f.w_in[:, :s])
        if f.b_in is not None:
            gate = gate + f.b_in[:, :s]
        self.gate = gate  # [tokens, n, size]: the bricks that run reuse it
        # Gated FFNs gate with act(gate); ungated ones have only act(up), the activation itself.
        return f.act(gate).abs().sum(-1)

    def select(self, x: torch.Tensor, k: int) -> torch.Tensor:
        if not bool(self.trained):
            raise BricksError("the threshold router is uncalibrated: calibrate it on data first (bricks moefy ... --data NAME=SOURCE)")
        scores = self(x)
        share = k / scores.shape[1]
        q = self.quantiles
        pos = (1.0 - share) * (len(q) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(q) - 1)
        threshold = q[lo] + (pos - lo) * (q[hi] - q[lo])
        mask = scores >= threshold.to(scores.dtype)
        return mask.scatter_(1, scores.argmax(1, keepdim=True), True)

    def macs_per_token(self) -> int:
        f = self._ffn[0]
        return f.n_bricks * f.brick_size * f.hidden  # the gate rows (reused, not recomputed, by the bricks)

    def fit(self, x, mass, k, epochs, lr, generator):
        scores = torch.cat([self(c) for c in x.split(1024)]).float().flatten()
        self.gate = None
        self.quantiles.copy_(torch.quantile(scores[torch.randperm(len(scores), generator=generator)[:1 << 24]].cpu(),
                                            torch.linspace(0, 1, self.QUANTILES)).to(self.quantiles.device))
        self.trained.fill_(True)


def make_router(name: str, ffn: nn.Module) -> Router:
    """The router `name` built on the bricked FFN it will route for."""
    return ROUTERS.get(name)(ffn)

"""Partitioners: cut each layer's FFN neurons into emergent bricks.

Methods (registered by name in `PARTITIONERS`):

- `random`        a seeded random balanced split (the baseline every method must beat);
- `param-kmeans`  balanced k-means on the neurons' input weight vectors (MoEfication's
                  parameter clustering split, https://arxiv.org/abs/2110.01786);
- `coactivation`  balanced partition of the co-activation graph: kernel k-means whose
                  kernel is the co-activation cosine similarity, i.e. neurons that fire
                  on the same tokens end up together (MoEfication's co-activation split);
- `functional`    balanced k-means on the neurons' per-sample activation profiles, the
                  quantity FuncScore is computed from: bricks of neurons that serve the
                  same samples / domains (Configurable Foundation Models, §4).

All methods share one balanced kernel k-means, so they differ only in the
similarity between neurons. Optionally the most frequently active neurons of
each layer are set aside as one always-active shared brick (as in llama-moe's
and CATS-style hybrids), the rest is partitioned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..arch import FFN, ffns
from ..brick import BrickSet, model_fingerprint
from ..errors import BricksError
from ..registry import Registry
from .capture import NeuronStats
from .coactivation import coactivation_similarity
from .specialization import func_scores


@dataclass
class LayerData:
    """What a partitioner may look at for one layer."""

    ffn: FFN
    neurons: torch.Tensor  # the neurons to partition (shared ones already removed)
    stats: NeuronStats | None


@dataclass(frozen=True)
class Partitioner:
    """A partition method: `split(layer data, number of bricks, seed)` -> `[len(neurons)]` balanced labels 0..n-1."""

    split: Callable[[LayerData, int, int], torch.Tensor]
    needs_stats: bool  # whether it reads activation statistics (then `bricks partition` needs --data)


PARTITIONERS: Registry = Registry("partition method")


def register(name: str, summary: str, needs_stats: bool):
    """Decorator: file a split function under `name` in `PARTITIONERS`."""
    def deco(fn):
        PARTITIONERS.add(name, Partitioner(fn, needs_stats), summary)
        return fn
    return deco


# --------------------------------------------------------------------------- balanced k-means


def _capacities(n: int, k: int) -> np.ndarray:
    caps = np.full(k, n // k)
    caps[: n % k] += 1
    return caps


def balanced_assign(dist: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Assign points to clusters of fixed capacity, greedily, most constrained points first.

    Points whose best cluster is much better than their second best (large
    regret) choose first, each taking its nearest cluster that still has room.
    """
    n, k = dist.shape
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    two = np.partition(dist, 1, axis=1)
    order = np.argsort(-(two[:, 1] - two[:, 0]), kind="stable")
    labels = np.empty(n, dtype=np.int64)
    left = caps.copy()
    masked = dist.copy()
    for i in order:
        c = int(np.argmin(masked[i]))
        labels[i] = c
        left[c] -= 1
        if left[c] == 0:
            masked[:, c] = np.inf
    return labels


def balanced_kernel_kmeans(kernel: torch.Tensor, k: int, seed: int = 0, iters: int = 30) -> torch.Tensor:
    """Balanced k-means in the feature space of a similarity `kernel` `[n, n]`.

    Distance of point i to cluster c: K_ii - 2 mean_{j in c} K_ij + mean_{j,l in c} K_jl.
    Clusters have sizes n//k or n//k + 1. Seeds by farthest-point sampling.
    """
    K = kernel.double().cpu().numpy()
    n = K.shape[0]
    if k > n:
        raise BricksError(f"cannot cut {n} neurons into {k} bricks: use at most {n} bricks")
    caps = _capacities(n, k)
    diag = np.diag(K)
    rng = np.random.default_rng(seed)
    seeds = [int(rng.integers(n))]
    d2 = diag + diag[seeds[0]] - 2 * K[:, seeds[0]]
    for _ in range(1, k):
        nxt = int(np.argmax(d2))
        seeds.append(nxt)
        d2 = np.minimum(d2, diag + diag[nxt] - 2 * K[:, nxt])
    dist = diag[:, None] + diag[seeds][None, :] - 2 * K[:, seeds]
    labels = balanced_assign(dist, caps)
    for _ in range(iters):
        onehot = np.zeros((n, k))
        onehot[np.arange(n), labels] = 1.0
        sizes = onehot.sum(0)
        cross = K @ onehot / sizes  # [n, k] mean similarity to each cluster
        within = np.einsum("ik,ik->k", onehot, cross) / sizes  # [k] mean similarity inside cluster
        dist = diag[:, None] - 2 * cross + within[None, :]
        new = balanced_assign(dist, caps)
        if np.array_equal(new, labels):
            break
        labels = new
    return torch.from_numpy(labels)


def _cosine_kernel(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return x @ x.t()


# --------------------------------------------------------------------------- methods


@register("random", "neurons dealt out at random (the baseline)", needs_stats=False)
def random_split(data: LayerData, n_bricks: int, seed: int) -> torch.Tensor:
    n = len(data.neurons)
    g = torch.Generator().manual_seed(seed * 100_003 + data.ffn.layer)
    labels = torch.arange(n) % n_bricks
    return labels[torch.randperm(n, generator=g)]


@register("param-kmeans", "balanced k-means on the neurons' gate/up weights (MoEfication)", needs_stats=False)
def param_kmeans(data: LayerData, n_bricks: int, seed: int) -> torch.Tensor:
    x = data.ffn.neuron_features()[data.neurons]  # [n, k*hidden] gate and up rows
    return balanced_kernel_kmeans(_cosine_kernel(x), n_bricks, seed)


@register("coactivation", "balanced partition of the co-activation graph (MoEfication, Emergent Modularity)", needs_stats=True)
def coactivation_split(data: LayerData, n_bricks: int, seed: int) -> torch.Tensor:
    if data.stats.coact is None:
        raise BricksError("the coactivation method needs co-activation counts: capture with coactivation=True")
    idx = data.neurons
    sim = coactivation_similarity(data.stats.coact[data.ffn.layer].double())[idx][:, idx]
    sim.fill_diagonal_(1.0)
    # The cosine similarity of binary activation vectors is a valid (PSD) kernel.
    return balanced_kernel_kmeans(sim, n_bricks, seed)


@register("functional", "neurons grouped by their per-sample activation profiles", needs_stats=True)
def functional_split(data: LayerData, n_bricks: int, seed: int) -> torch.Tensor:
    profile = data.stats.sample_mean[data.ffn.layer][:, data.neurons].double()  # [samples, n]
    z = (profile - profile.mean(0)) / profile.std(0).clamp(min=1e-12)
    return balanced_kernel_kmeans(_cosine_kernel(z.t()), n_bricks, seed)


# --------------------------------------------------------------------------- driver


def partition(model, method: str, n_bricks: int, stats: NeuronStats | None = None, shared_fraction: float = 0.0,
              seed: int = 0, layers: list[int] | None = None, info: dict | None = None) -> BrickSet:
    """Cut every layer's FFN into `n_bricks` balanced emergent bricks.

    Args:
        method: a name in `PARTITIONERS`.
        stats: activation statistics (`capture_stats`); needed by activation-based
            methods and by `shared_fraction`.
        shared_fraction: share of each layer's neurons, the most frequently active,
            set aside as one always-active shared brick (index `n_bricks`).

    Example:
        >>> stats = bricks.capture_stats(model, domains)
        >>> bs = bricks.partition(model, "coactivation", 64, stats, shared_fraction=0.0625)
        >>> bs.save("runs/smollm-bricks")
    """
    method_ = PARTITIONERS.get(method)
    needs_stats = method_.needs_stats
    if not 0.0 <= shared_fraction < 1.0:
        raise BricksError(f"shared fraction must be in [0, 1), got {shared_fraction}")
    if (needs_stats or shared_fraction > 0) and stats is None:
        raise BricksError(f"method {method!r}{' with shared neurons' if shared_fraction else ''} needs activation data: pass --data")
    blocks = ffns(model)
    d_ff = blocks[0].d_ff
    n_shared = round(shared_fraction * d_ff)
    if n_bricks < 1 or n_bricks > d_ff - n_shared:
        raise BricksError(f"--bricks must be between 1 and {d_ff - n_shared} (the layer's routable neurons), got {n_bricks}")
    freq = stats.activation_frequency() if stats is not None else None
    scores = func_scores(stats.sample_mean, stats.sample_domain, len(stats.domains)) if stats is not None and len(stats.domains) > 1 else None
    assignments, shared, meta = [], [], []
    for f in blocks:
        all_neurons = torch.arange(f.d_ff)
        if n_shared:
            shared_idx = freq[f.layer].topk(n_shared).indices
            routed = all_neurons[~torch.isin(all_neurons, shared_idx)]
        else:
            shared_idx, routed = torch.empty(0, dtype=torch.long), all_neurons
        labels = method_.split(LayerData(f, routed, stats), n_bricks, seed)
        a = torch.full((f.d_ff,), n_bricks, dtype=torch.int64)
        a[routed] = labels.long()
        assignments.append(a)
        shared.append(n_bricks if n_shared else None)
        meta.append(_brick_meta(a, f.layer, n_bricks + (1 if n_shared else 0), freq, scores, stats))
    info = {"method": method, "n_bricks": n_bricks, "shared_fraction": shared_fraction, "seed": seed, **(info or {})}
    return BrickSet(assignments, model_fingerprint(model), "emergent", method, shared, meta, info)


def _brick_meta(a, layer, n, freq, scores, stats) -> list[dict]:
    out = []
    for b in range(n):
        m = {}
        members = a == b
        if freq is not None:
            m["activation_frequency"] = round(float(freq[layer][members].mean()), 5)
        if scores is not None:
            per_domain = scores[layer][:, members].mean(-1)
            d = int(per_domain.argmax())
            m["domain"] = stats.domains[d]
            m["func_score"] = round(float(per_domain[d]), 4)
        out.append(m)
    return out


def activation_statistics(model, tokenizer, specs, windows: int = 48, seq_len: int = 128, cett: float = 0.2,
                          batch_size: int = 8) -> NeuronStats:
    """Neuron statistics for activation-based partitioners.

    "Active" means above the per-layer threshold that gives every layer the
    same CETT (default 0.2, near the CETT-PPL-1% point of typical models), set
    on a calibration sample of the same data.
    """
    from ..data import load_domains
    from .capture import capture_stats
    from .sparsity import activation_sample, cett_curve

    domains = load_domains(specs, tokenizer, "train", seq_len, windows)
    calib_ids = torch.cat([d.windows[: max(1, 8 // len(domains))] for d in domains])
    calib = activation_sample(model, calib_ids, 1024, batch_size)
    eps = torch.tensor([cett_curve(a, f.down_weight()).eps_for(cett) for a, f in zip(calib, ffns(model))])
    return capture_stats(model, domains, batch_size, eps)

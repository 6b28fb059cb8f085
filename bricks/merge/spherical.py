"""Merge methods on the sphere: NuSLERP, Multi-SLERP and the Karcher mean, with mergekit's parameters.

- `nuslerp`: SLERP between exactly two models with weights instead of one `t`
  (`t = w₁ / (w₀ + w₁)`); with a base, between their task vectors.
  `nuslerp_flatten` (default true) treats the tensor as one vector, else each
  row (`nuslerp_row_wise: false`) or each column (`true`) is interpolated alone.
- `multislerp`: a weighted mean of any number of models on the sphere: unit
  vectors are mapped to the tangent space at their weighted mean direction,
  averaged there and mapped back, then scaled by the weighted mean norm; with a
  base, of task vectors.
- `karcher`: the Riemannian (Karcher) mean of all inputs' directions with equal
  weights, found by fixed-point iteration (`max_iter`, `tol`), scaled by the
  mean norm. Every input takes part, the base model too when one is given.

All work in float32 (float64 inputs stay float64) and return the inputs' dtype.
"""

from __future__ import annotations

import torch

from ..errors import BricksError
from .methods import METHODS, _work_dtype


def _weights(model_params: list[dict]) -> list[float]:
    return [float(p.get("weight", 1.0)) for p in model_params]


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """SLERP along the last axis of `v0`, `v1` (one interpolation per vector); colinear vectors interpolate linearly."""
    n0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    n1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (n0 * n1).sum(-1, keepdim=True).clamp(-1, 1)
    straight = (1 - cos * cos) <= eps * eps
    theta = torch.acos(torch.where(straight, torch.zeros_like(cos), cos))
    curved = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(straight, (1 - t) * v0 + t * v1, curved)


@METHODS.register("nuslerp", "SLERP of two models by their weights, optionally of task vectors (mergekit's NuSLERP)")
def _nuslerp(base_of, tensors, model_params, params, generator):
    if len(tensors) != 2:
        raise BricksError(f"nuslerp merges exactly two models (besides an optional base), got {len(tensors)}")
    w0, w1 = _weights(model_params)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    dtype = _work_dtype(tensors[0])
    base = base_of()  # None without a base model
    a, b = (x.to(dtype) for x in tensors)
    if base is not None:
        a, b = a - base.to(dtype), b - base.to(dtype)
    shape = a.shape
    if params.get("nuslerp_flatten", True):
        out = nuslerp(t, a.reshape(-1), b.reshape(-1)).reshape(shape)
    elif params.get("nuslerp_row_wise", False) and a.dim() > 1:  # mergekit: vectors along the first axis
        out = nuslerp(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1)
    else:
        out = nuslerp(t, a, b)
    if base is not None:
        out = out + base.to(dtype)
    return out.to(tensors[0].dtype)


@METHODS.register("multislerp", "weighted mean of any number of models on the hypersphere (mergekit's Multi-SLERP)")
def _multislerp(base_of, tensors, model_params, params, generator):
    if len(tensors) == 1:
        return tensors[0]
    dtype = _work_dtype(tensors[0])
    base = base_of()  # None without a base model
    x = torch.stack([t.to(dtype) for t in tensors]).reshape(len(tensors), -1)
    if base is not None:
        x = x - base.to(dtype).reshape(1, -1)
    w = torch.tensor(_weights(model_params), dtype=dtype)
    if params.get("normalize_weights", True):
        w = w / w.sum()
    eps = float(params.get("eps", 1e-8))
    norms = x.norm(dim=1, keepdim=True)
    if float(norms.max()) < eps:  # no model changed this tensor (a frozen layer): the base, or the shared value
        return tensors[0] if base is None else base
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    if mean.norm() < eps:
        if len(tensors) != 2:
            raise BricksError("multislerp: the weighted directions cancel out (opposite task vectors with balancing "
                              "weights): change the weights")
        out = w[0] * x[0] + w[1] * x[1]
    else:
        mean = mean / mean.norm()
        tangent = ((units - (units @ mean)[:, None] * mean) * w[:, None]).sum(0)
        length = tangent.norm() + eps
        out = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms[:, 0] * w).sum()
    out = out.reshape(tensors[0].shape)
    if base is not None:
        out = out + base.to(dtype)
    return out.to(tensors[0].dtype)


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The weighted Karcher mean of the tensors' directions, scaled by the weighted sum of their norms."""
    dtype = _work_dtype(tensors[0])
    x = [t.to(dtype).reshape(-1) for t in tensors]
    norms = [v.norm() for v in x]
    scale = sum(a * n for a, n in zip(alphas, norms))
    keep = [i for i, n in enumerate(norms) if n > tol]
    if not keep:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in keep)
    a = [alphas[i] / total for i in keep]
    units = [x[i] / norms[i] for i in keep]
    mean = sum(ai * u for ai, u in zip(a, units))
    mean = units[0].clone() if mean.norm() < tol else mean / mean.norm()
    for _ in range(max_iter):
        # The gradient of the summed squared geodesic distances: each direction's log map at the current mean.
        step = torch.zeros_like(mean)
        for ai, u in zip(a, units):
            cos = torch.clamp(mean @ u, -1.0, 1.0)
            theta = torch.arccos(cos)
            if theta < tol:
                continue
            step += ai * (theta / torch.sin(theta)) * (u - cos * mean)
        length = step.norm()
        if length < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (step / length)
        if mean.norm() > tol:
            mean = mean / mean.norm()
    return (scale * mean).reshape(tensors[0].shape)


@METHODS.register("karcher", "Riemannian (Karcher) mean of all models' directions, equal weights "
                             "(https://arxiv.org/abs/2603.04972)")
def _karcher(base_of, tensors, model_params, params, generator):
    base = base_of()
    inputs = list(tensors) + ([base] if base is not None else [])
    if len(inputs) == 1:
        return inputs[0]
    out = karcher_mean(inputs, [1.0 / len(inputs)] * len(inputs), int(params.get("max_iter", 10)),
                       float(params.get("tol", 1e-5)))
    return out.to(tensors[0].dtype)

"""Merge methods that choose, entry by entry, what of each task vector to keep (mergekit's parameters and semantics).

- `nearswap` (two models, base required): move the base towards the other
  model only where they are already close: weight `clip(t / |a − b|, 0, 1)`.
- `sce` (https://arxiv.org/abs/2408.07990): Select the `select_topk` share of
  entries whose task vectors vary most across models, Calculate a weight per
  model from its mean squared task vector, Erase entries whose sign disagrees
  with the summed sign; the weighted mean of what is left.
- `arcee_fusion` (two models, base required): keep the other model's change
  only where its importance `|Δ| · KL(softmax(other) ‖ softmax(base))` (KL per
  row) is above a dynamic threshold, median + 1.5 · IQR of the importances.
- `ram` (Reinforced Agent Merging, https://arxiv.org/abs/2601.13572): an entry
  changed by one model only (|τ| > `epsilon`) keeps that change whole; one
  changed by several takes their mean.
- `ramplus_tl`: RAM whose unique changes are scaled per model by
  `1 + r · clip(shared/unique, 0, alpha)` (counts of that model's shared and
  unique entries in this tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import BricksError
from .methods import METHODS, _work_dtype

QUANTILE_SAMPLE = 1_000_000  # arcee_fusion: quartiles of a larger tensor are estimated from this many entries


def _task_vectors(base_of, tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """(base in the work dtype, stacked task vectors [models, ...])."""
    base = base_of()
    dtype = _work_dtype(base)
    b = base.to(dtype)
    return b, torch.stack([t.to(dtype) - b for t in tensors])


@METHODS.register("nearswap", "take the other model's value where it is within t of the base (two models)")
def _nearswap(base_of, tensors, model_params, params, generator):
    if len(tensors) != 1:
        raise BricksError(f"nearswap merges the base with exactly one other model, got {len(tensors)}")
    if "t" not in params:
        raise BricksError("nearswap needs the parameter t (the distance under which the other model's value is taken)")
    base = base_of()
    dtype = _work_dtype(base)
    a, b = base.to(dtype), tensors[0].to(dtype)
    w = (float(params["t"]) / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return (w * b + (1 - w) * a).to(base.dtype)


@METHODS.register("sce", "select the most varying entries, weight models by task-vector energy, erase sign "
                         "conflicts (https://arxiv.org/abs/2408.07990)")
def _sce(base_of, tensors, model_params, params, generator):
    b, tv = _task_vectors(base_of, tensors)
    share = float(params.get("select_topk", 1.0))
    if share < 1:
        var = tv.var(0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * share)
        keep = torch.zeros(var.numel(), dtype=tv.dtype)
        if k:
            keep[var.abs().reshape(-1).topk(k).indices] = 1
        tv = tv * keep.reshape(var.shape)
    energy = tv.square().reshape(len(tensors), -1).mean(1)
    weights = energy / energy.sum() if float(energy.sum()) >= 1e-6 else torch.full_like(energy, 1 / len(tensors))
    majority = torch.where(tv.sum(0) >= 0, 1.0, -1.0).to(tv.dtype)
    kept = weights.view(-1, *[1] * (tv.dim() - 1)) * (tv.sign() == majority)
    merged = (tv * kept).sum(0) / kept.sum(0).clamp(min=1e-6)
    return (b + merged).to(base_of().dtype)


def _quartiles(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    flat = x.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:  # estimated from a sample (with replacement), as mergekit does
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator)]
    ordered = flat.sort().values
    return ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]


@METHODS.register("arcee_fusion", "keep the other model's changes whose importance is an outlier (two models)")
def _arcee_fusion(base_of, tensors, model_params, params, generator):
    if len(tensors) != 1:
        raise BricksError(f"arcee_fusion merges the base with exactly one other model, got {len(tensors)}")
    base = base_of()
    dtype = _work_dtype(base)
    a, b = base.to(dtype), tensors[0].to(dtype)
    p, q = F.softmax(b, dim=-1) + 1e-8, F.softmax(a, dim=-1) + 1e-8
    importance = (b - a).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    q1, median, q3 = _quartiles(importance, generator)
    keep = (importance >= median + 1.5 * (q3 - q1)).to(dtype)
    return (a + (b - a) * keep).to(base.dtype)


def _ram(base_of, tensors, params, model_params, plus: bool):
    b, tv = _task_vectors(base_of, tensors)
    eps = float(params.get("epsilon", model_params[0].get("epsilon", 1e-5) if model_params else 1e-5))
    flat = tv.reshape(len(tensors), -1)
    changed = flat.abs() > eps
    count = changed.sum(0, keepdim=True)
    unique, shared = count == 1, count > 1
    flat = flat * changed
    scale = torch.ones(len(tensors), 1, dtype=flat.dtype)
    if plus:
        rho = (changed & shared).sum(1) / (changed & unique).sum(1).clamp(min=eps)
        scale = (1 + float(params.get("r", 0.1)) * rho.clamp(0, float(params.get("alpha", 0.2)))).unsqueeze(1).to(flat.dtype)
    merged = (flat * unique * scale + flat * shared / count.clamp(min=1)).sum(0)
    return (b + merged.reshape(b.shape)).to(base_of().dtype)


@METHODS.register("ram", "unique changes kept whole, shared ones averaged (https://arxiv.org/abs/2601.13572)")
def _ram_merge(base_of, tensors, model_params, params, generator):
    return _ram(base_of, tensors, params, model_params, plus=False)


@METHODS.register("ramplus_tl", "RAM with each model's unique changes scaled by its share of shared entries")
def _ramplus_tl(base_of, tensors, model_params, params, generator):
    return _ram(base_of, tensors, params, model_params, plus=True)

"""Merging adapter bricks in ΔW space (`bricks adapter merge`).

`linear` and `task_arithmetic` are exact as concatenated factors (the merged
rank is the sum of the ranks); every other method of `bricks.merge.methods`
runs on the dense ΔW of each module with a zero base, and is re-factored by
truncated SVD.
"""

from __future__ import annotations

import math

import torch

from ..adapters.lora import AdapterBrick, LoRAModule
from ..errors import BricksError
from .methods import METHODS, check_params, merge


def refactor(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-r factors of ΔW `[out, in]` (truncated SVD): B `[out, r]`, A `[r, in]`, relative Frobenius error."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, len(s))
    root = s[:r].sqrt()
    total = float(s.square().sum())
    err = math.sqrt(float(s[r:].square().sum()) / total) if total > 0 else 0.0
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float(), err


def merge_adapters(bricks: list[AdapterBrick], weights: list[float] | None = None, method: str = "linear",
                   rank: int | None = None, params: dict | None = None, model_params: list[dict] | None = None,
                   seed: int = 0, name: str = "merged") -> tuple[AdapterBrick, dict]:
    """Merge adapter bricks in ΔW space; returns the merged brick and a report.

    `linear` (weighted average, `normalize` as in mergekit) and `task_arithmetic`
    (weighted sum) are exact as concatenated factors (rank = sum of ranks); any
    other method of `bricks.merge.methods` runs on the dense ΔW with a zero base.
    With `rank`, each module's result is re-factored by truncated SVD and the
    report gives the relative Frobenius truncation error per module.
    """
    if len(bricks) < 2:
        raise BricksError("merging needs at least two adapter bricks")
    if method not in METHODS or method in ("slerp", "model_stock"):
        raise BricksError(f"adapter merging supports {', '.join(m for m in METHODS if m not in ('slerp', 'model_stock'))}; "
                          f"got {method!r}")
    bases = {b.base_model for b in bricks if b.base_model}
    if len(bases) > 1:
        raise BricksError(f"adapters for different bases: {', '.join(sorted(bases))}")
    modules = set(bricks[0].modules)
    for b in bricks[1:]:
        if set(b.modules) != modules:
            diff = sorted(set(b.modules) ^ modules)
            raise BricksError(f"adapters {bricks[0].name!r} and {b.name!r} target different modules (e.g. {diff[0]}): "
                              "merge adapters with the same target modules")
    weights = list(weights) if weights is not None else [1.0] * len(bricks)
    check_params(method, dict(params or {}), [{**p, "weight": w} for p, w in zip(model_params or [{}] * len(bricks), weights)])
    if len(weights) != len(bricks):
        raise BricksError(f"{len(weights)} weights for {len(bricks)} adapters")
    if rank is not None and rank < 1:
        raise BricksError(f"target rank must be >= 1, got {rank}")
    params = dict(params or {})
    model_params = model_params or [{} for _ in bricks]
    model_params = [{**p, "weight": w} for p, w in zip(model_params, weights)]
    out, errors = {}, {}
    for i, n in enumerate(sorted(modules)):
        parts = [b.modules[n] for b in bricks]
        fan = parts[0].fan_in_fan_out
        shapes = {(m.B.shape[0], m.A.shape[1]) for m in parts}
        if len(shapes) > 1:
            raise BricksError(f"{n}: the adapters' deltas have different shapes {sorted(shapes)}: adapters for different bases")
        if method in ("linear", "task_arithmetic"):
            norm = sum(weights) if method == "linear" and params.get("normalize", True) else 1.0
            norm = 1.0 if abs(norm) < 1e-8 else norm
            lam = float(params.get("lambda", 1.0)) if method == "task_arithmetic" else 1.0
            A = torch.cat([m.A.float() for m in parts])
            B = torch.cat([m.B.float() * (w * m.scaling * lam / norm) for m, w in zip(parts, weights)], dim=1)
            if rank is None or rank >= A.shape[0]:
                out[n] = LoRAModule(A, B, float(A.shape[0]), False, fan)
                continue
            delta = B @ A
        else:
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            deltas = [m.B.float() @ m.A.float() * m.scaling for m in parts]
            delta = merge(method, torch.zeros_like(deltas[0]), deltas, model_params, params, g)
        r = rank if rank is not None else sum(m.rank for m in parts)
        B, A, err = refactor(delta, r)
        out[n] = LoRAModule(A, B, float(A.shape[0]), False, fan)
        errors[n] = err
    config = {k: v for k, v in bricks[0].config.items() if k not in ("rank_pattern", "alpha_pattern", "r", "lora_alpha")}
    merged = AdapterBrick(out, {**config, "use_rslora": False}, name)
    report = {"method": method, "weights": weights, "ranks": sorted({m.rank for m in out.values()}),
              "truncation_error": {"max": max(errors.values(), default=0.0),
                                   "mean": sum(errors.values()) / len(errors) if errors else 0.0}}
    return merged, report

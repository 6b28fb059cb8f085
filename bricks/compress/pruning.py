"""Pruning the linear layers of the decoder blocks: magnitude and Wanda, unstructured or N:M.

Scores (higher = kept):

- `magnitude`: |W_ij|, compared within the whole layer (the usual baseline);
- `wanda` (Sun et al. 2023, "A Simple and Effective Pruning Approach for
  LLMs"): |W_ij| · ||X_j||₂, where ||X_j||₂ is the norm of input feature j over
  the calibration tokens, compared within each output row (as the paper does:
  a row's weights compete only with each other).

A target `sparsity` prunes that share of each layer (of each row for Wanda);
an N:M `pattern` ("2:4") keeps the N highest scores in every group of M
consecutive input weights of a row, the pattern sparse tensor cores run.

Wanda's calibration is sequential, as in the paper: the input norms of block l
are measured with blocks 0..l-1 already pruned, so later layers see the inputs
they will get. The forward pass stops after block l each time, so the whole
calibration costs about half of one forward per block.

Embeddings and the LM head are never pruned (Wanda leaves them dense too).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..arch import decoder_layers
from ..errors import BricksError
from ..runtime import batches, input_device, progress


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """"2:4" -> (2, 4): keep N of every M; None stays None."""
    if pattern is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if m is None or not 0 < int(m.group(1)) < int(m.group(2)):
        raise BricksError(f"N:M pattern {pattern!r} is not of the form N:M with 0 < N < M (e.g. 2:4)")
    return int(m.group(1)), int(m.group(2))


def prunable(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers of the decoder blocks, by full module name (attention and FFN projections)."""
    blocks = decoder_layers(model)
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    return {f"{prefix}.{n}": m for n, m in blocks.named_modules() if isinstance(m, nn.Linear)}


def check_pattern(model: nn.Module, nm: tuple[int, int]) -> None:
    """Every prunable layer's input size is a multiple of M, else a one-line error before any work."""
    for name, lin in prunable(model).items():
        if lin.in_features % nm[1]:
            raise BricksError(f"pattern {nm[0]}:{nm[1]} needs input sizes divisible by {nm[1]}; {name} has "
                              f"{lin.in_features} inputs")


def mask(score: torch.Tensor, sparsity: float | None, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    """Boolean keep-mask of a `[out, in]` score matrix: the N:M pattern, or the top (1 - sparsity) share."""
    if nm is not None:
        n, m = nm
        groups = score.reshape(score.shape[0], -1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(2, groups.topk(n, dim=2).indices, True)
        return keep.reshape(score.shape)
    if per_row:
        k = int(round(score.shape[1] * sparsity))
        keep = torch.ones_like(score, dtype=torch.bool)
        if k:
            keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
        return keep
    k = int(round(score.numel() * sparsity))
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        keep[score.flatten().topk(k, largest=False).indices] = False
    return keep.reshape(score.shape)


class _Stop(Exception):
    """Raised by a hook to end a calibration forward pass once the block of interest has run."""


@torch.no_grad()
def _input_norms(model: nn.Module, block: nn.Module, layers: dict[str, nn.Linear], windows: torch.Tensor,
                 batch_size: int) -> dict[str, torch.Tensor]:
    """||X_j||₂ over every calibration token, for each linear layer of `block`."""
    sq = {n: torch.zeros(lin.in_features, dtype=torch.float64) for n, lin in layers.items()}

    def record(name):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq[name] += (x * x).sum(0).cpu()
        return hook

    def stop(_module, _args, _output):
        raise _Stop

    handles = [lin.register_forward_pre_hook(record(n)) for n, lin in layers.items()]
    handles.append(block.register_forward_hook(stop))
    dev = input_device(model)
    try:
        for rows in batches(len(windows), batch_size, shard=False):
            try:
                model(input_ids=windows[rows].to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: s.sqrt().float() for n, s in sq.items()}


@torch.no_grad()
def prune(model: nn.Module, method: str, sparsity: float | None = None, pattern: str | None = None,
          windows: torch.Tensor | None = None, batch_size: int = 8) -> dict:
    """Prune `model`'s decoder linear layers in place; returns the achieved sparsity per layer kind and overall.

    `windows` (calibration token windows `[n, seq]`, train split) are needed by `wanda`.

    Example:
        >>> prune(model, "wanda", pattern="2:4", windows=train[0].windows)
    """
    if method not in ("magnitude", "wanda"):
        raise BricksError(f"unknown pruning method {method!r}: choose from magnitude, wanda")
    nm = parse_pattern(pattern)
    if (sparsity is None) == (nm is None):
        raise BricksError("give either a sparsity in (0, 1) or an N:M pattern, not both and not neither")
    if sparsity is not None and not 0 < sparsity < 1:
        raise BricksError(f"sparsity must be in (0, 1), got {sparsity}")
    if nm is not None:
        check_pattern(model, nm)
    if method == "wanda" and (windows is None or windows.numel() == 0):
        raise BricksError("wanda scores weights by their inputs: give calibration data (--data NAME=SOURCE)")
    all_layers = prunable(model)
    kept = {}
    for block in progress(decoder_layers(model), f"pruning ({method})"):
        own = {n: lin for n, lin in all_layers.items() if any(lin is m for m in block.modules())}
        norms = _input_norms(model, block, own, windows, batch_size) if method == "wanda" else {}
        for name, lin in own.items():
            w = lin.weight
            score = w.abs().float() * norms[name].to(w.device) if method == "wanda" else w.abs().float()
            keep = mask(score, sparsity, nm, per_row=method == "wanda")
            w.mul_(keep.to(w.dtype))
            kept[name] = (int(keep.sum()), keep.numel())
    return sparsity_report(kept)


def sparsity_report(kept: dict[str, tuple[int, int]]) -> dict:
    """Share of zero weights overall and per projection kind (q_proj, up_proj, ...) from (kept, total) counts."""
    kinds: dict[str, list[int]] = {}
    for name, (k, total) in kept.items():
        acc = kinds.setdefault(name.rsplit(".", 1)[-1], [0, 0])
        acc[0] += k
        acc[1] += total
    k_all, t_all = sum(k for k, _ in kept.values()), sum(t for _, t in kept.values())
    return {"sparsity": round(1 - k_all / t_all, 6), "pruned_weights": t_all - k_all, "prunable_weights": t_all,
            "per_kind": {n: round(1 - k / t, 6) for n, (k, t) in kinds.items()}}


def measured_sparsity(model: nn.Module) -> dict:
    """The sparsity report of a model as it is (zeros counted in the prunable layers)."""
    return sparsity_report({n: (int((lin.weight != 0).sum()), lin.weight.numel()) for n, lin in prunable(model).items()})


def nm_violations(weight: torch.Tensor, nm: tuple[int, int]) -> int:
    """Groups of M consecutive inputs in a `[out, in]` weight holding more than N non-zeros."""
    n, m = nm
    return int(((weight.reshape(weight.shape[0], -1, m) != 0).sum(2) > n).sum())

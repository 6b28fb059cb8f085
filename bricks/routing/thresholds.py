"""Calibrating teal's threshold selection: per layer, the magnitudes above which the configured shares of the
inputs and neurons lie, on the train split (TEAL's own choice of what to keep; see `bricks.routing.sparse_ffn`)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import BricksError
from .base import routed_layers
from .sparse_ffn import SparseFFN


@torch.no_grad()
def calibrate_thresholds(model: nn.Module, windows: torch.Tensor, batch_size: int = 8, max_tokens: int = 2048,
                         seed: int = 0) -> list[tuple[float, float]]:
    """Switch every `SparseFFN` of `model` to threshold selection, calibrated on token windows `[n, seq]`
    (train split): each layer's magnitudes keep its configured shares on average over up to `max_tokens` of its
    inputs, as they arrive with the layers before it routed by top-k. Returns the (inputs, neurons) thresholds."""
    layers = [m for m in routed_layers(model) if isinstance(m, SparseFFN)]
    if not layers:
        raise BricksError("no activation-sparse FFN to calibrate: assemble the model with router teal first")
    if windows.numel() == 0:
        raise BricksError("threshold calibration needs token windows: give --data NAME=SOURCE")
    g = torch.Generator().manual_seed(seed)
    share = min(1.0, max_tokens / windows.numel())  # of the tokens, drawn at random
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}

    def keep(i):
        def hook(module, args):
            x = args[0].reshape(-1, module.hidden)
            pick = torch.rand(len(x), generator=g) < share
            seen[i].append(x[pick.to(x.device)].float().cpu())
        return hook

    for m in layers:
        m.selection = "topk"  # the routed function of the configured shares while inputs are gathered
    handles = [m.register_forward_pre_hook(keep(i)) for i, m in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(windows), batch_size):
            model(windows[start:start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
    out = []
    for i, m in enumerate(layers):
        m.selection = "threshold"
        out.append(m.fit_thresholds(torch.cat(seen[i]).to(m.w_in_t.device)))
    return out


def set_thresholds(model: nn.Module, thresholds: list, where: str) -> None:
    """Threshold selection as it was calibrated: one saved (inputs, neurons) pair per `SparseFFN` of `model`, in
    layer order; a list that does not fit is a one-line error naming `where` it came from."""
    layers = [m for m in routed_layers(model) if isinstance(m, SparseFFN)]
    thresholds = thresholds or []
    if len(thresholds) != len(layers) or any(len(t) != 2 for t in thresholds):
        raise BricksError(f"{where}: threshold selection needs one (inputs, neurons) threshold pair per layer "
                          f"({len(layers)}), found {len(thresholds)}: the directory is corrupt")
    for m, t in zip(layers, thresholds):
        m.selection, m.thresholds = "threshold", (float(t[0]), float(t[1]))

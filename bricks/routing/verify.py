"""Checks that a BrickSet rebuilds its model: reassembled from the bricks' weights, and executed brick by brick."""

from __future__ import annotations

import torch
from torch import nn

from ..brick import BrickSet
from ..runtime import run_model
from .assembly import bricked


@torch.no_grad()
def verify_bricks(model: nn.Module, brickset: BrickSet, ids: torch.Tensor) -> dict[str, float]:
    """Max |logit difference| to the dense model of the model rebuilt from all bricks, two ways.

    - `reassembled`: every FFN's weights cut into the bricks' slices, cleared, and
      written back from the slices; 0 when the bricks are an exact cover.
    - `brickwise`: FFNs executed as a sum of per-brick outputs (`BrickedFFN`);
      exact in real arithmetic, in fp32 it differs by summation order (about
      the model's own fp32 rounding noise: permuting the neurons of the dense
      model changes SmolLM2's logits by ~1e-4).
    """
    dense = run_model(model, ids, logits=True).float()
    pieces = [brickset.brick_weights(model, layer) for layer in range(brickset.n_layers)]
    brickset.reassemble(model, pieces)
    reassembled = run_model(model, ids, logits=True).float()
    with bricked(model, brickset, brickwise=True):
        brickwise = run_model(model, ids, logits=True).float()
    return {"reassembled": float((dense - reassembled).abs().max()), "brickwise": float((dense - brickwise).abs().max())}

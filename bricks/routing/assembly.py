"""Assembling a model from routed FFNs: every FFN swapped for a bricked or an activation-sparse one, for good or
for the length of a `with` block."""

from __future__ import annotations

import contextlib

from torch import nn

from ..arch import FFN, ffns
from ..brick import BrickSet
from ..errors import BricksError
from .base import swap_ffns, swapped
from .bricked_ffn import BrickedFFN
from .sparse_ffn import SparseFFN


def assemble_bricked(model: nn.Module, brickset: BrickSet, router: str | None = None, active: float = 1.0,
                     compute: float | None = None) -> list[nn.Module]:
    """Replace every FFN of `model` (in place) by a `BrickedFFN` built from `brickset`.

    `compute`, when given, overrides `active`: each layer runs as many routed
    bricks as fit in that FFN compute fraction (router and shared brick included).

    Returns the original FFN modules, in layer order (see `bricked` to swap back).
    """
    brickset.check_model(model)
    if brickset.n_layers != len(ffns(model)):
        raise BricksError(f"BrickSet has {brickset.n_layers} layers, the model {len(ffns(model))}")
    if compute is not None and not 0.0 < compute <= 1.0:
        raise BricksError(f"compute fraction must be in (0, 1], got {compute}")

    def make(f: FFN) -> BrickedFFN:
        m = BrickedFFN(f, brickset.assignments[f.layer], brickset.shared[f.layer], router, active)
        if compute is not None:
            m.set_compute(compute)
        return m
    return swap_ffns(model, make, "bricked")


@contextlib.contextmanager
def bricked(model: nn.Module, brickset: BrickSet, router: str | None = None, active: float = 1.0,
            brickwise: bool = False):
    """Run `model` with bricked FFNs inside the block; the dense FFNs come back on exit.

    `brickwise` runs every FFN brick by brick even at full activity (instead of
    the bit-exact dense computation in the original neuron order).

    Example:
        >>> with bricked(model, bs, router="centroid", active=0.5):
        ...     logits = model(ids).logits
    """
    originals = assemble_bricked(model, brickset, router, active)
    for m in model.modules():
        if isinstance(m, BrickedFFN):
            m.dense_at_full = not brickwise
    with swapped(model, originals):
        yield model


def assemble_sparse(model: nn.Module, compute: float = 1.0) -> list[nn.Module]:
    """Replace every FFN of `model` (in place) by a `SparseFFN` at FFN compute fraction `compute`.

    Returns the original FFN modules, in layer order.
    """
    return swap_ffns(model, lambda f: SparseFFN(f, compute), "sparse")


@contextlib.contextmanager
def sparsified(model: nn.Module, compute: float):
    """Run `model` with `SparseFFN`s at FFN compute fraction `compute` inside the block; the dense FFNs come back on exit.

    Example:
        >>> with sparsified(model, 0.5):
        ...     out = model.generate(ids, max_new_tokens=32)
    """
    with swapped(model, assemble_sparse(model, compute)):
        yield model

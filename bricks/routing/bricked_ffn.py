"""The bricked FFN: an FFN executed as a sum of emergent bricks.

Weights are stored brick-major and contiguous: the neurons of brick b occupy
rows `offsets[b]:offsets[b+1]` of every stored matrix (input projections as
`[d_ff, hidden]`, the output projection transposed to `[d_ff, hidden]`), so a
brick's weights are plain views, never gathered copies. With every brick active
the module computes exactly the dense FFN, up to summation order.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from ..arch import FFN, decoder_layers, ffns, layout_for
from ..brick import BrickSet
from ..errors import BricksError


class BrickedFFN(nn.Module):
    """Drop-in replacement of one layer's FFN module, computed brick by brick.

    Args:
        ffn: handle on the dense FFN (weights are copied brick-major).
        assignment: `[d_ff]` brick index of every neuron.
    """

    def __init__(self, ffn: FFN, assignment: torch.Tensor):
        super().__init__()
        assignment = assignment.to(torch.int64).cpu()
        order = torch.argsort(assignment, stable=True)  # neurons grouped by brick
        sizes = torch.bincount(assignment)
        self.register_buffer("order", order, persistent=False)
        self.offsets = [0] + torch.cumsum(sizes, 0).tolist()
        dev = ffn.down_weight().device
        take = lambda w: None if w is None else nn.Parameter(w.detach()[order.to(dev)].clone().contiguous(), requires_grad=False)  # noqa: E731
        self.w_gate = take(ffn.gate_weight())  # [d_ff, hidden] or None
        self.b_gate = take(ffn.gate_bias())
        self.w_up = take(ffn.up_weight())  # [d_ff, hidden]
        self.b_up = take(ffn.up_bias())
        self.w_down = take(ffn.down_weight().t())  # [d_ff, hidden]: row i = neuron i's output direction
        b = ffn.down_bias()
        self.b_down = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)
        self.act = ffn.act

    @property
    def n_bricks(self) -> int:
        return len(self.offsets) - 1

    def brick_output(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Contribution of brick b to the FFN output, `[..., hidden]`."""
        s, e = self.offsets[b], self.offsets[b + 1]
        h = x @ self.w_up[s:e].t()
        if self.b_up is not None:
            h = h + self.b_up[s:e]
        if self.w_gate is not None:
            g = x @ self.w_gate[s:e].t()
            if self.b_gate is not None:
                g = g + self.b_gate[s:e]
            h = self.act(g) * h
        else:
            h = self.act(h)
        return h @ self.w_down[s:e]

    def forward(self, x: torch.Tensor, bricks: Sequence[int] | None = None) -> torch.Tensor:
        chosen = range(self.n_bricks) if bricks is None else bricks
        out = torch.zeros(*x.shape[:-1], self.w_down.shape[1], dtype=x.dtype, device=x.device)
        for b in chosen:
            out = out + self.brick_output(x, b)
        if self.b_down is not None:
            out = out + self.b_down
        return out


def assemble_bricked(model: nn.Module, brickset: BrickSet) -> list[nn.Module]:
    """Replace every FFN of `model` (in place) by a `BrickedFFN` built from `brickset`.

    Returns the original FFN modules, in layer order (see `bricked` to swap back).
    """
    brickset.check_model(model)
    layout = layout_for(model)
    if not layout.mlp:
        raise BricksError(f"{model.config.model_type} keeps its FFN inside the decoder block; bricked execution "
                          "needs a separate FFN module (supported: every family but opt)")
    blocks = ffns(model)
    if brickset.n_layers != len(blocks):
        raise BricksError(f"BrickSet has {brickset.n_layers} layers, the model {len(blocks)}")
    layers = decoder_layers(model, layout)
    originals = []
    for f, a in zip(blocks, brickset.assignments):
        originals.append(f.module)
        setattr(layers[f.layer], layout.mlp, BrickedFFN(f, a))
    return originals


@contextlib.contextmanager
def bricked(model: nn.Module, brickset: BrickSet):
    """Run `model` with brick-wise FFNs inside the block; the dense FFNs come back on exit.

    Example:
        >>> with bricked(model, bs):
        ...     logits = model(ids).logits
    """
    layout = layout_for(model)
    layers = decoder_layers(model, layout)
    originals = assemble_bricked(model, brickset)
    try:
        yield model
    finally:
        for layer, module in zip(layers, originals):
            setattr(layer, layout.mlp, module)


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
    from ..analysis.capture import run_model

    dense = run_model(model, ids, logits=True).float()
    pieces = [brickset.brick_weights(model, layer) for layer in range(brickset.n_layers)]
    brickset.reassemble(model, pieces)
    reassembled = run_model(model, ids, logits=True).float()
    with bricked(model, brickset):
        brickwise = run_model(model, ids, logits=True).float()
    return {"reassembled": float((dense - reassembled).abs().max()), "brickwise": float((dense - brickwise).abs().max())}

"""Customized bricks beside a routed FFN's projections: CPET's LoRA and recovery bricks on an activation-sparse
or MoEfied base (as CA-LoRA trained on MoEfication).

A routed FFN keeps a `beside` slot: a module (`bricks.compress.cpet.FFNBricks`) whose `inputs(x)` is what the
bricks add to the gate|up pre-activations, `[tokens, k * d_ff]` in the dense neuron order (gate rows, then up
rows), and whose `output(a)` is what they add to the FFN output, read from the activations `[tokens, d_ff]`.
The bricks adapt the dense projections the FFN came from (`projections`: their names, for `attach_cpet`).

A bricked FFN stores its neurons brick-major, so a forward pass with bricks beside it (`BesideRun`) gathers
the pre-activation deltas into brick order and scatters the activations the routed bricks computed back into
neuron order. The neurons of bricks a token did not select are zero there: the bricks beside the down
projection read what the compressed FFN computed, as they read the output of a pruned projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dense_projections(ffn) -> dict[str, str]:
    """The dense FFN's projection names by role ("gate", "up", "in" for a fused gate|up projection, "down")."""
    lay = ffn.layout
    return {name: role for name, role in ((lay.gate, "gate"), (lay.up, "up"), (lay.fused_gate_up, "in"), (lay.down, "down"))
            if name}


class BesideRun:
    """One forward pass of a `BrickedFFN` with bricks beside it.

    `bricks` `[tokens, n_bricks, k * size]` and `shared` `[tokens, k * n_shared]`: the pre-activation deltas in the
    bricked FFN's storage order (padding rows get zero); `put` / `put_shared` collect the activations the pass
    computed; `output()` is what the bricks add to the FFN output.
    """

    def __init__(self, ffn, x: torch.Tensor):
        self.ffn = ffn
        gather_in, shared_in, self.scatter = _indices(ffn)
        delta = F.pad(ffn.beside.inputs(x), (0, 1))  # [tokens, k * d_ff + 1]: the last column is padding's zero
        self.bricks = delta[:, gather_in]
        self.shared = None if shared_in is None else delta[:, shared_in]
        self.acts = x.new_zeros(x.shape[0], ffn.d_ff + 1, dtype=torch.float32)  # the last column takes padding

    def put(self, rows: torch.Tensor, bricks: torch.Tensor | int, a: torch.Tensor) -> None:
        """Activations `a` `[..., size]` of brick(s) `bricks` for tokens `rows` (broadcast against each other)."""
        self.acts.index_put_((rows, self.scatter[bricks]), a.float())

    def put_shared(self, a: torch.Tensor) -> None:
        self.acts[:, self.ffn.shared_members] = a.float()

    def output(self) -> torch.Tensor:
        return self.ffn.beside.output(self.acts[:, :-1])


def _indices(ffn) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gather indices of the pre-activation deltas (per brick, shared brick) and scatter indices of the activations
    (per brick), padding mapped to the extra last column; cached on the module (the assignment never changes)."""
    cached = getattr(ffn, "_beside_indices", None)
    if cached is not None and cached[0].device == ffn.members.device:
        return cached
    d_ff, members = ffn.d_ff, ffn.members
    pad = members < 0
    k = 2 if ffn.gated else 1
    gather_in = torch.cat([torch.where(pad, k * d_ff, members + j * d_ff) for j in range(k)], dim=1)  # [n, k*size]
    m = ffn.shared_members
    shared_in = torch.cat([m + j * d_ff for j in range(k)]) if len(m) else None
    scatter = torch.where(pad, d_ff, members)  # [n, size]
    ffn._beside_indices = (gather_in, shared_in, scatter)
    return ffn._beside_indices

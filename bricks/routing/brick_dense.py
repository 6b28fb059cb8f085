"""A bricked FFN seen as the dense FFN it came from: its tensors back in the original neuron order.

`BrickedFFN` stores its weights brick-major (`bricks.routing.bricked_ffn`). At full activity it runs as the
dense FFN, in the original order of its neurons, so that it reproduces the dense model bit for bit; recovery
training writes its weights back into a dense model the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..arch import FFN


class DenseView:
    """The dense tensors of a `BrickedFFN`, and what computes every brick (a mixin: it uses the bricked FFN's storage
    and shared brick)."""

    @torch.no_grad()
    def neuron_order(self) -> dict[str, torch.Tensor]:
        """The FFN's tensors in the original neuron order: `gate`/`up` `[d_ff, hidden]` (+ `*_bias`), `down` `[hidden, d_ff]`."""
        k = 2 if self.gated else 1
        size = self.brick_size
        names = ["gate", "up"] if self.gated else ["up"]
        rows = self.w_in.new_zeros(k, self.d_ff, self.hidden)
        bias = None if self.b_in is None else self.b_in.new_zeros(k, self.d_ff)
        down = self.w_in.new_zeros(self.d_ff, self.hidden)
        real = self.members >= 0
        idx = self.members[real]  # neuron ids, brick by brick
        w_in = self.w_in.view(self.n_bricks, k, size, self.hidden)
        rows[:, idx] = w_in.transpose(0, 1)[:, real]
        if bias is not None:
            bias[:, idx] = self.b_in.view(self.n_bricks, k, size).transpose(0, 1)[:, real]
        down[idx] = self.w_down[real]
        if self.shared_in is not None:
            m = self.shared_members
            rows[:, m] = self.shared_in.view(k, len(m), self.hidden)
            if bias is not None:
                bias[:, m] = self.shared_b_in.view(k, len(m))
            down[m] = self.shared_down
        out = {name: rows[j] for j, name in enumerate(names)}
        if bias is not None:
            out.update({f"{name}_bias": bias[j] for j, name in enumerate(names)})
        out["down"] = down.t().contiguous()
        return out

    def brick_mass(self, x: torch.Tensor) -> torch.Tensor:
        """True output mass `[tokens, n_bricks]` of every brick, sum_i |a_i|·||W_down[:, i]|| (computes all of `a`)."""
        h = torch.einsum("th,nkh->tnk", x, self.w_in)
        if self.b_in is not None:
            h = h + self.b_in
        return (self._act(h, self.brick_size).abs() * self.down_norms).sum(-1)

    def _dense_weights(self) -> dict[str, torch.Tensor]:
        """`neuron_order`, kept (`_dense_cache`) while the FFN runs at full activity or may take the `dense` path
        (`dense_fallback`): the FFN's weights twice meanwhile. On the brick-major storage every brick ran slower
        than the dense FFN it stands for (bench/README.md, the Zen 5's `--dense-fallback` grids)."""
        cache = self._dense_cache
        if cache is None or cache["down"].device != self.w_in.device or cache["down"].dtype != self.w_in.dtype:
            self._dense_cache = None  # the old copy goes before the new one is made
            self._dense_cache = self.neuron_order()
        return self._dense_cache

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every brick: the dense FFN with the original neuron order (the same kernels as the model's own FFN)."""
        w = self._dense_weights()
        # Bricks beside the FFN (`bricks.routing.beside`) add to the pre-activations and the output.
        delta = None if self.beside is None else self.beside.inputs(x).to(x.dtype)
        up = F.linear(x, w["up"], w.get("up_bias"))
        if self.gated:
            gate = F.linear(x, w["gate"], w.get("gate_bias"))
            if delta is not None:
                gate, up = gate + delta[:, :self.d_ff], up + delta[:, self.d_ff:]
            a = self.act(gate) * up
        else:
            a = self.act(up if delta is None else up + delta)
        y = F.linear(a, w["down"], self.b_down)
        return y if self.beside is None else y + self.beside.output(a).to(y.dtype)

    @torch.no_grad()
    def write_dense(self, dense: FFN) -> None:
        parts = dense.neuron_parts()  # [d_ff, ...] views: gate, up, down (as rows), biases
        for name, t in self.neuron_order().items():
            if name in parts:
                parts[name].copy_(t.t() if name == "down" else t)
        if self.b_down is not None:
            dense.down_bias().copy_(self.b_down)


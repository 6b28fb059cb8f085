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
    """The dense tensors of a `BrickedFFN` (a mixin: it uses the bricked FFN's storage and shared brick)."""

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
        down[idx] = (self.w_down if self.down_rows else self.w_down.transpose(1, 2))[real]
        if self.shared_in is not None:
            m = self.shared_members
            rows[:, m] = self.shared_in.view(k, len(m), self.hidden)
            if bias is not None:
                bias[:, m] = self.shared_b_in.view(k, len(m))
            down[m] = self.shared_down if self.down_rows else self.shared_down.t()
        out = {name: rows[j] for j, name in enumerate(names)}
        if bias is not None:
            out.update({f"{name}_bias": bias[j] for j, name in enumerate(names)})
        out["down"] = down.t().contiguous()
        return out

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        """Every brick: the dense FFN with the original neuron order (the same kernels as the model's own FFN)."""
        if self._dense_cache is None:
            self._dense_cache = self.neuron_order()
        w = self._dense_cache
        if self.gated:
            a = self.act(F.linear(x, w["gate"], w.get("gate_bias"))) * F.linear(x, w["up"], w.get("up_bias"))
        else:
            a = self.act(F.linear(x, w["up"], w.get("up_bias")))
        return F.linear(a, w["down"], self.b_down)

    @torch.no_grad()
    def write_dense(self, dense: FFN) -> None:
        parts = dense.neuron_parts()  # [d_ff, ...] views: gate, up, down (as rows), biases
        for name, t in self.neuron_order().items():
            if name in parts:
                parts[name].copy_(t.t() if name == "down" else t)
        if self.b_down is not None:
            dense.down_bias().copy_(self.b_down)


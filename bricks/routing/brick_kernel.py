"""The tokens of a bricked FFN in one call of the compiled CPU kernel (`bricks.routing.cpu_kernels`).

In eager torch a decode token runs a few small matmuls per selected brick, and each costs tens of microseconds
(more in bf16), which a small FFN's whole dense call does not: with half of 64 bricks selected on the default
model's FFN the `bricks` path lost to dense (`bench/README.md`). A batch loops over bricks the same way, or
computes every brick (`masked`). The kernel reads the same rows, the chosen bricks' gate|up rows as dot products
with the tokens that chose them and then their down rows, in one call.

Every dtype stores W_down's rows brick by brick (`BrickedFFN`), so that each token's down projection is the sum
of its selected bricks' rows, several tokens' in one pass over the rows.
"""

from __future__ import annotations

import torch

from ..errors import BricksError
from . import cpu_kernels
from .sparse_paths import SILU


class BrickKernel:
    """The `kernel` path of `BrickedFFN` (a mixin: it uses the bricked FFN's storage)."""

    @property
    def paths(self) -> tuple[str, ...]:
        return self.eager_paths + (("kernel",) if self.kernel_applies() else ())

    def compiled_activation(self, h: torch.Tensor) -> bool:
        """Whether `_masked` may take `silu(gate) * up` of every brick from the compiled CPU kernel
        (`cpu_kernels.gated_silu`): torch's elementwise kernels on each brick's strided gate and up halves took
        several times as long (bench/README.md). A gated SiLU FFN on the CPU, below float64 (it computes in
        fp32), with no gradient to carry."""
        return (h.device.type == "cpu" and self.gated and isinstance(self.act, SILU) and h.dtype != torch.float64
                and not (torch.is_grad_enabled() and h.requires_grad) and cpu_kernels.available())

    def kernel_applies(self) -> bool:
        """Whether the kernel computes this FFN's routed function: gated SiLU, no input bias, no bricks beside."""
        return self._kernel_refusal() is None

    def _kernel_refusal(self) -> str | None:
        if not (self.gated and isinstance(self.act, SILU) and self.b_in is None and self.beside is None):
            return "it needs a gated SiLU FFN with no input bias or bricks beside"
        if self.w_in.dtype == torch.float64:
            return "it sums in fp32, below float64's precision"
        if self.router is not None and self.router.reuses_gate:  # the kernel would compute the gate rows again
            return "its router computes the gate pre-activations, which the kernel does not take"
        return cpu_kernels.reason()

    def _kernel(self, x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """The routed bricks' output `[tokens, hidden]` (no shared brick, no output bias)."""
        why = self._kernel_refusal()  # bricks beside may have come since the path was fixed
        if why is not None:
            raise BricksError(f"the kernel path is not available here: {why}")
        return cpu_kernels.brick_ffn(x.contiguous(), self.w_in, self.w_down, sel.contiguous())

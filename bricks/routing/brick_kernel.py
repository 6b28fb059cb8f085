"""The tokens of a bricked FFN in one call of a compiled kernel: the CPU's (`bricks.routing.cpu_kernels`), and on a
GPU triton's (`bricks.routing.kernels.brick_rows`, the `triton` path of a decode token).

In eager torch a decode token runs a few small matmuls per selected brick, and each costs tens of microseconds
(more in bf16), which a small FFN's whole dense call does not: with half of 64 bricks selected on the default
model's FFN the `bricks` path lost to dense (`bench/README.md`). A batch loops over bricks the same way, or
computes every brick (`masked`). The kernel reads the same rows, the chosen bricks' gate|up rows as dot products
with the tokens that chose them and then their down rows, in one call.

Every dtype stores W_down's rows brick by brick (`BrickedFFN`), so that each token's down projection is the sum
of its selected bricks' rows, several tokens' in one pass over the rows.

On a GPU a decode token's grouped GEMMs have one row per group, a shape they are not built for (`bench/README.md`,
"On a GPU"), and gathering the k bricks' weights copies them: the triton path reads each selected brick's rows in
place, a block of rows per program.
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

    def _fused_refusal(self) -> str | None:
        """Why a kernel computing `silu(gate) * up` inside cannot run this FFN's routed function, or None."""
        if not (self.gated and isinstance(self.act, SILU) and self.b_in is None and self.beside is None):
            return "it needs a gated SiLU FFN with no input bias or bricks beside"
        return None

    def _kernel_refusal(self) -> str | None:
        why = self._fused_refusal()
        if why is not None:
            return why
        if self.w_in.dtype == torch.float64:
            return "it sums in fp32, below float64's precision"
        if self.router is not None and self.router.reuses_gate:  # the kernel would compute the gate rows again
            return "its router computes the gate pre-activations, which the kernel does not take"
        return cpu_kernels.reason()

    def _kernel(self, x: torch.Tensor, sel: torch.Tensor, counts: torch.Tensor | None = None) -> torch.Tensor:
        """The routed bricks' output `[tokens, hidden]` (no shared brick, no output bias); `counts` gains the down
        projection's rows multiplied and the (token, brick) pairs whose gate|up rows were (`cpu_kernels.brick_ffn`)."""
        why = self._kernel_refusal()  # bricks beside may have come since the path was fixed
        if why is not None:
            raise BricksError(f"the kernel path is not available here: {why}")
        return cpu_kernels.brick_ffn(x.contiguous(), self.w_in, self.w_down, sel.contiguous(), counts=counts)

    def triton_applies(self) -> bool:
        """Whether the triton path runs this FFN's routed function where its weights are."""
        return self._triton_refusal() is None

    def _triton_refusal(self) -> str | None:
        from . import kernels  # imports triton: only where the path is asked for

        why = self._fused_refusal()
        if why is not None:
            return why
        if self.router is not None and not self.router.exact_k:  # k per token: shapes fixed, no host sync
            return "its router does not pick exactly k bricks per token"
        if not kernels.available(self.w_in.device):
            return "it needs a CUDA device with triton installed (or TRITON_INTERPRET=1)"
        return None

    def _triton(self, x: torch.Tensor, sel: torch.Tensor, y: torch.Tensor) -> None:
        """Add each token's selected bricks' output into y `[tokens, hidden]`, a token at a time (a decode token)."""
        from . import kernels

        why = self._triton_refusal()
        if why is not None:
            raise BricksError(f"the triton path is not available here: {why}")
        # Each token's k bricks first (a stable sort of the mask), found on the device: no host sync.
        idx = torch.argsort(sel.to(torch.int8), dim=1, descending=True, stable=True)[:, :self.k_active]
        for t in range(x.shape[0]):
            y[t] += kernels.brick_rows(x[t], self.w_in, self.w_down, idx[t]).to(y.dtype)

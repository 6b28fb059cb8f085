"""One token of a bricked FFN in one call of the compiled CPU kernel (`bricks.routing.cpu_kernels.brick_ffn`).

In eager torch a decode token runs a few small matmuls per selected brick, and each costs tens of microseconds
(more in bf16), which a small FFN's whole dense call does not: with half of 64 bricks selected on the default
model's FFN the `bricks` path lost to dense (`bench/README.md`). The kernel reads the same rows, the chosen
bricks' gate|up rows as dot products with the token and then their down rows, in one call.
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

    def kernel_applies(self) -> bool:
        """Whether the kernel computes this FFN's routed function: gated SiLU, no input bias, no bricks beside."""
        return self._kernel_refusal() is None

    def _kernel_refusal(self) -> str | None:
        if not (self.gated and isinstance(self.act, SILU) and self.b_in is None and self.beside is None):
            return "it needs a gated SiLU FFN with no input bias or bricks beside"
        return cpu_kernels.reason()

    def _kernel(self, x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        """The routed bricks' output `[tokens, hidden]` (no shared brick, no output bias), a token per call: the
        chooser offers it to one token (`paths_for`), and a path fixed by `set_path` may see several."""
        why = self._kernel_refusal()  # bricks beside may have come since the path was fixed
        if why is not None:
            raise BricksError(f"the kernel path is not available here: {why}")
        return torch.cat([cpu_kernels.brick_ffn(x[t:t + 1].contiguous(), self.w_in, self.w_down, sel[t].contiguous(),
                                                self.down_rows) for t in range(x.shape[0])])

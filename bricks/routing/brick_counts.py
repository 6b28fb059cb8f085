"""What a bricked FFN computes and ran: multiply-accumulates per token, and the fractions of the dense FFN's."""

from __future__ import annotations

import torch

from ..errors import BricksError


class BrickCounts:
    """MACs and compute fractions of a `BrickedFFN` (a mixin: it uses the bricked FFN's storage, router and
    `counts`: tokens, bricks the routed function selected, bricks the paths ran, summed over calls; `host_counts`:
    the same, for the calls that counted plain numbers on the CPU)."""

    def _count(self, tokens: int, chosen, ran) -> None:
        """Add a call's tokens and bricks (chosen, ran: numbers, or tensors on the device) to the counts."""
        if isinstance(chosen, torch.Tensor) or isinstance(ran, torch.Tensor) or self.counts.device.type != "cpu":
            # Scalars or device tensors, one entry at a time: no host sync, and capturable in a CUDA graph.
            self.counts[0] += tokens
            self.counts[1] += chosen
            self.counts[2] += ran
        else:  # plain numbers on the CPU: added in Python, as a tensor op costs tens of microseconds between kernel
            # calls (bench/README.md, "Bricks' calls")
            host = self.host_counts
            host[0] += tokens
            host[1] += chosen
            host[2] += ran

    def reset_counts(self) -> None:
        self.counts.zero_()
        self.host_counts[:] = [0, 0, 0]

    def dense_macs_per_token(self) -> int:
        return (3 if self.gated else 2) * self.d_ff * self.hidden

    def _macs(self, k: float) -> float:
        """MACs per token with k routed bricks: bricks + shared brick + router (when it routes)."""
        if k >= self.n_bricks:
            return self.dense_macs_per_token()
        reused = self.router is not None and self.router.reuses_gate  # the router computed the gate rows already
        per_brick = (self.w_in.shape[1] - (self.brick_size if reused else 0) + self.brick_size) * self.hidden
        shared = 0 if self.shared_in is None else self.shared_in.numel() + self.shared_down.numel()  # MACs = weights read
        router = self.router.macs_per_token() if self.router is not None else 0
        return k * per_brick + shared + router

    def compute_fraction(self) -> float:
        """FFN multiply-accumulates per token (router + bricks + shared) over dense, as configured.

        For a threshold router the number of bricks varies per token: this is the
        calibrated mean; `executed_fraction` gives what the forward passes ran.
        """
        return self._macs(min(self.k_active, self.n_bricks)) / self.dense_macs_per_token()

    def ranked_per_token(self) -> int:
        return self.n_bricks if self.router is not None and self.k_active < self.n_bricks else 0

    def _fraction(self, which: int) -> float | None:
        tokens = self.counts[0].item() + self.host_counts[0]
        bricks = self.counts[which].item() + self.host_counts[which]
        return None if tokens == 0 else self._macs(bricks / tokens) / self.dense_macs_per_token()

    def routed_fraction(self) -> float | None:
        return self._fraction(1)

    def executed_fraction(self) -> float | None:
        return self._fraction(2)

    def set_compute(self, target: float) -> None:
        """Choose the active share so that the compute fraction (router and shared brick included) is at most `target`."""
        dense = self.dense_macs_per_token()
        fits = [k for k in range(1, self.n_bricks + 1) if self._macs(k) <= target * dense]
        if not fits:
            raise BricksError(f"a compute fraction of {target} leaves no room for one routed brick after the shared brick "
                              f"and the router ({self._macs(1) / dense:.3f} at least): raise --compute or use less shared neurons")
        self.active = max(fits) / self.n_bricks

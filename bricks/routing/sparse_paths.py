"""How `SparseFFN` runs a call: its eager CPU paths, and the compiled ones (a CPU kernel, a GPU kernel).

All of them compute the same function (`SparseFFN`'s docstring); they differ
in what they read and how they use the threads:

- `masked`: dense matmuls on the zeroed entries (several tokens between them
  keep nearly every input channel; training; counted as the whole FFN);
- `bags`: each token reads its kept rows through `F.embedding_bag` (one bag
  per token, on one thread);
- `split`: one token's rows in one bag per thread, their sums added;
- `kernel`: the tokens in one call of the compiled CPU kernel
  (`bricks.routing.cpu_kernels`), when it is built;
- `triton`: one token on the GPU kernels (`bricks.routing.kernels`).

`SparsePaths` is a mixin of `SparseFFN`, which holds the weights (`w_in_t`,
`w_down_t`), the budget (`n_in`, `n_act`, thresholds) and the counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

try:
    from transformers.activations import SiLUActivation
except ImportError:  # older transformers: nn.SiLU
    SiLUActivation = None

from ..errors import BricksError
from . import cpu_kernels
from .paths import SERIAL

# Weights above this size are read in memory order (see `SparsePaths._kept`).
SORT_ABOVE_BYTES = 8 << 20
# Activation modules the compiled kernels compute themselves (transformers' own SiLU class, and torch's).
SILU = (nn.SiLU, *([SiLUActivation] if SiLUActivation is not None else []))


class SparsePaths:
    """The execution paths of `SparseFFN` (see the module docstring)."""

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        """The function of `_sparse` as dense matmuls on zeroed entries (the masks are constants: in training,
        gradients flow through the kept entries only). Executed: the whole FFN."""
        if x.device.type == "cuda" and not torch.is_grad_enabled() and self._fused_masks():
            return self._masked_fused(x)
        n = x.shape[0]
        xm, kept_in = self._zero_dropped(x, 0)
        a = self._activation(self._pre(xm @ self.w_in_t, x))
        am, kept_act = self._zero_dropped(a, 1)
        y = am @ self.w_down_t
        self._count(n, kept_in, kept_act, n * self.hidden, n * self.d_ff)
        return self._post(y, a)

    def _fused_masks(self) -> bool:
        from . import kernels  # imports triton: only off the CPU

        return kernels.available(self.w_in_t.device)

    def _masked_fused(self, x: torch.Tensor) -> torch.Tensor:
        """`_masked` with each projection's selection, zeroing and count in one GPU kernel (`kept_rows.zero_dropped`)
        where torch takes several; a gated SiLU FFN's activations computed in the same kernel, in fp32."""
        from .kept_rows import zero_dropped

        counts = self._counts_on(x.device)
        inputs, neurons = self._gpu_selection()
        xm = zero_dropped(x.contiguous(), self.hidden, counts, 1, **inputs)
        h = self._pre(xm @ self.w_in_t, x)
        a = None
        if self._activations_inside():
            am = zero_dropped(h, self.d_ff, counts, 2, silu_gated=True, **neurons)
        else:
            a = self._activation(h)
            am = zero_dropped(a.contiguous(), self.d_ff, counts, 2, **neurons)
        return self._post(am @ self.w_down_t, a)

    def _gpu_selection(self) -> tuple[dict, dict]:
        """How the GPU kernels choose the inputs and the neurons kept: the calibrated thresholds, or the top-k."""
        if self.selection == "topk":
            return {"top": self.n_in}, {"top": self.n_act}
        return {"threshold": self._threshold(0)}, {"threshold": self._threshold(1)}

    def _activations_inside(self) -> bool:
        """Whether the GPU kernels compute the activations from gate|up themselves: a gated SiLU, nothing beside."""
        return self.gated and self.b_in is None and self.beside is None and isinstance(self.act, SILU)

    def _zero_dropped(self, v: torch.Tensor, which: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        """`v` with the entries each token drops zeroed (inputs: 0, neurons: 1), and how many were kept. Under a
        threshold that is one kernel, hardshrink (|v| > t kept), and the count stays on the device (no host sync)."""
        t = self._threshold(which)
        if t is None:
            n = self.n_in if which == 0 else self.n_act
            if cpu_kernels.ranks(v) and not (torch.is_grad_enabled() and v.requires_grad):
                return cpu_kernels.top_magnitudes(v.contiguous(), n, zero_dropped=True), v.shape[0] * n  # one pass
            return v * self._top(v.detach(), n), v.shape[0] * n
        vm = F.hardshrink(v, t)
        return vm, torch.count_nonzero(vm)

    def _offsets_for(self, tokens: int, n: int, parts: int, device) -> torch.Tensor:
        """Bag starts when each of `tokens` tokens has `n` rows, cut into `parts` bags each."""
        key = (tokens, n, parts, device)
        offsets = self._offsets.get(key)
        if offsets is None:
            offsets = self._offsets[key] = (torch.arange(tokens * parts, device=device) * n) // parts
        return offsets

    def _rows(self, v: torch.Tensor, which: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows of `weight` each token keeps, flat, with their values and each token's first entry."""
        t = self._threshold(which)
        if t is None:
            n = self.n_in if which == 0 else self.n_act
            idx = self._kept(v, n, weight)
            return idx.flatten(), v.gather(-1, idx).flatten(), self._offsets_for(v.shape[0], n, 1, v.device)
        tokens, cols = (v.abs() > t).nonzero(as_tuple=True)  # by token, then in memory order
        starts = torch.searchsorted(tokens, torch.arange(v.shape[0], device=v.device))
        return cols, v[tokens, cols], starts

    @staticmethod
    def _bag(idx: torch.Tensor, values: torch.Tensor, starts: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Per token t: the sum of values[j] * weight[idx[j]] over its entries -> [tokens, weight.shape[1]], reading
        only those rows (one bag per token, each on one CPU thread)."""
        return F.embedding_bag(idx, weight, starts, mode="sum", per_sample_weights=values)

    @staticmethod
    def _kept(v: torch.Tensor, n: int, weight: torch.Tensor) -> torch.Tensor:
        """Indices of the n largest |v| per row; sorted when the weight is larger than a core's cache, so that its
        rows are read in memory order (faster bags from main memory; no gain from cache, where the sort costs)."""
        idx = v.abs().topk(n, dim=-1, sorted=False).indices
        return idx.sort(-1).values if weight.numel() * weight.element_size() > SORT_ABOVE_BYTES else idx

    def _sparse(self, x: torch.Tensor, split: bool = False) -> torch.Tensor:
        """Inference: each token reads only its kept input channels' rows of W_in^T and its kept neurons' rows of
        W_down^T (`split`: one token's rows over every thread)."""
        if x.shape[0] == 1:
            return self._token(x, split)
        idx, values, starts = self._rows(x, 0, self.w_in_t)
        a = self._activation(self._pre(self._bag(idx, values, starts, self.w_in_t), x))
        j, values, starts = self._rows(a, 1, self.w_down_t)
        y = self._bag(j, values, starts, self.w_down_t)
        # The rows the bags were given to read: what ran, and what the routed function selected.
        self._count(x.shape[0], idx.numel(), j.numel())
        return self._post(y, a)

    def _token(self, x: torch.Tensor, split: bool) -> torch.Tensor:
        """`_sparse` of one token `[1, hidden]` (a decode step, without the compiled kernel) in as few eager
        operations as it takes: inside a decode step each one costs far more than its arithmetic."""
        parts = torch.get_num_threads() if split else 1
        v = x[0]
        idx = self._select(v, 0, self.w_in_t)
        h = self._rows_sum(idx, v[idx], self.w_in_t, parts)
        if self.b_in is not None or self.beside is not None:
            h = self._pre(h[None], x)[0]
        a = self._activation(h)
        j = self._select(a, 1, self.w_down_t)
        y = self._rows_sum(j, a[j], self.w_down_t, parts)
        self._count(1, idx.numel(), j.numel())
        return self._post(y[None], a[None]) if self.b_down is not None or self.beside is not None else y[None]

    def _select(self, v: torch.Tensor, which: int, weight: torch.Tensor) -> torch.Tensor:
        """Indices of one token's kept inputs (0) or neurons (1) in `v` `[n]`."""
        t = self._threshold(which)
        if t is None:
            return self._kept(v, self.n_in if which == 0 else self.n_act, weight)
        return (v.abs() > t).nonzero().view(-1)  # in memory order

    def _rows_sum(self, idx: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
        """sum_j values[j] * weight[idx[j]] `[weight.shape[1]]`, its rows read in `parts` bags (one per thread)."""
        if idx.numel() == 0:  # a threshold can keep nothing
            return weight.new_zeros(weight.shape[1])
        parts = min(parts, idx.numel())
        if parts == 1:
            return F.embedding_bag(idx[None], weight, mode="sum", per_sample_weights=values[None])[0]
        out = F.embedding_bag(idx, weight, self._offsets_for(1, idx.numel(), parts, idx.device), mode="sum",
                              per_sample_weights=values)
        return out.sum(0)

    def _counts_on(self, device) -> torch.Tensor:
        """The compiled paths' counts, kept where they run: tokens, inputs and neurons kept, then inputs and neurons
        multiplied beside those (`cpu_kernels.teal_ffn`; the triton path multiplies only what it keeps)."""
        if self._kernel_counts is None or self._kernel_counts.device != device:
            self._kernel_counts = torch.zeros(5, dtype=torch.int64, device=device)
        return self._kernel_counts

    def set_path(self, path: str | None) -> None:
        if path is not None and path.removesuffix(SERIAL) == "kernel":
            self._kernel_available()
        super().set_path(path)
        if not self.dense_fallback and not (path or "").startswith("dense"):
            self._model_layout = None  # the `dense` path's copy of the weights (`SparseFFN.model_layout`)

    def _kernel_available(self) -> None:
        if "kernel" not in self.paths:
            why = cpu_kernels.reason() or "it needs a gated SiLU FFN with no input bias or bricks beside"
            raise BricksError(f"the kernel path is not available here: {why}")

    def _kernel(self, x: torch.Tensor, parallel: bool = True) -> torch.Tensor:
        """Tokens `[tokens, hidden]` in one call of the compiled CPU kernel (`bricks.routing.cpu_kernels`, which
        refuses when it is not built), on torch's threads or (`parallel=False`) on the calling one."""
        if self.beside is not None or self.b_in is not None:  # added since the path was fixed
            self._kernel_available()
        y = cpu_kernels.teal_ffn(x.contiguous(), self.w_in_t, self.w_down_t, self.n_in, self.n_act, self._threshold(0),
                                 self._threshold(1), self._counts_on(x.device), parallel)
        return y if self.b_down is None else y + self.b_down

    def _triton(self, x: torch.Tensor) -> torch.Tensor:
        """One token `[1, hidden]` on the GPU kernels: each projection loads only its kept rows, chosen by the
        kernels (a calibrated threshold, or the top-k). A gated SiLU FFN computes its activations inside the down
        projection's kernel."""
        from . import kernels

        if not kernels.available(x.device):
            raise BricksError("the triton path needs a CUDA device with triton installed (or TRITON_INTERPRET=1)")
        counts = self._counts_on(x.device)
        inputs, neurons = self._gpu_selection()
        h = self._pre(kernels.sparse_rows(x[0], self.w_in_t, counts, 1, **inputs), x[0])
        a = None
        if self._activations_inside():
            y = kernels.sparse_rows(h, self.w_down_t, counts, 2, silu_gated=True, **neurons)
        else:
            a = self._activation(h)
            y = kernels.sparse_rows(a, self.w_down_t, counts, 2, **neurons)
        return self._post(y.to(x.dtype)[None], a)

"""The activation-sparse FFN: single neurons and input channels as the bricks, chosen by magnitude (TEAL).

Brick-level routing of a SwiGLU FFN loses much more than the neuron-level
oracle suggests (`notebooks/routing_tradeoffs.ipynb`): a predictor has to guess
which bricks matter before computing them. TEAL (Liu et al. 2024) needs no
predictor: in every projection it skips the input entries of small magnitude,
which are known exactly when the projection runs. Here, per token:

- the gate and up projections read only the `keep_in` share of the FFN input
  channels with the largest |x| (their rows of W_in^T);
- the down projection reads only the `keep_act` share of the neurons with the
  largest |a| (their rows of W_down^T), among the activations just computed.

How the compute is split between inputs and neurons, and how it compares
with brick routers at the same compute, is measured by
`bench/routing_quality_probe.py` (figures in `bench/README.md`). Recovery
training (`bricks.routing.recovery`) works on it unchanged.

Two ways to choose the kept entries (`selection`): `topk`, the default, keeps
exactly the configured share of every token, needs no calibration data and
cannot drift when recovery changes the weights; `threshold` (TEAL's own
choice) keeps the entries above one magnitude per layer and projection input,
calibrated on data so that the mean share is the configured one
(`calibrate_thresholds`). A comparison is far cheaper than a top-k, whose
cost on CPU rivals a small FFN's matmuls once a call has many tokens; the
price is a share that varies from token to token (the routed fraction
counts it).

Storage is unit-major, as for bricks: `w_in_t` `[hidden, k*d_ff]` (row c: what
input channel c feeds into every gate and up neuron) and `w_down_t`
`[d_ff, hidden]` (row i: neuron i's output). A token's sparse matrix-vector
product then reads contiguous rows and skips the others.

Several paths compute that function (`bricks.routing.sparse_paths`): on the
CPU, `bags` and `split` gather a token's rows with `F.embedding_bag`, `kernel`
runs a call's tokens (a decode token, a small batch) in one call of a compiled
kernel (`bricks.routing.cpu_kernels`) and `masked` runs dense matmuls on the zeroed
entries (what several tokens together want, since between them they keep
nearly every input channel; counted as the whole FFN in the executed
fraction, as it is). Which one runs is timed, not guessed
(`bricks.routing.paths`). On a GPU, a decode token runs the `triton` path
(`bricks.routing.kernels`); several tokens run `masked`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import FFN
from ..errors import BricksError
from . import base
from .base import RoutedFFN
from .beside import dense_projections
from . import cpu_kernels
from .cpu_kernels import KERNEL_MAX_TOKENS
from .paths import SERIAL, running, with_serial
from .sparse_paths import SILU, SparsePaths

# Share of the FFN compute spent on the gate/up inputs: keep_in = 1.2 x compute, keep_act the rest. At compute
# 0.5 that is 60% of the inputs and 30% of the neurons (the split `bench/routing_quality_probe.py` compares).
IN_OVER_COMPUTE = 1.2
SELECTIONS = ("topk", "threshold")
# Several tokens take the bags only while they read at most this many times the FFN's weights between them.
MAX_BAG_READS = 2.0


class SparseFFN(SparsePaths, RoutedFFN):
    """Drop-in replacement of one layer's FFN module, skipping small inputs of each projection per token.

    Args:
        ffn: handle on the dense FFN (weights are copied, transposed to unit-major rows).
        compute: FFN compute fraction per token, in (0, 1] (sets `keep_in` and `keep_act`, see `set_compute`).
        selection: "topk" (the exact share per token) or "threshold" (calibrated magnitudes, see the module
            docstring; `calibrate_thresholds` sets them).
    """

    eager_paths = ("bags", "split", "masked")
    device_paths = ("triton",)

    def __init__(self, ffn: FFN, compute: float = 1.0, selection: str = "topk"):
        super().__init__()
        if selection not in SELECTIONS:
            raise BricksError(f"unknown selection {selection!r}: one of {', '.join(SELECTIONS)}")
        self.selection = selection
        self.thresholds: tuple[float, float] | None = None  # (inputs, neurons) magnitudes kept, for "threshold"
        self.gated = ffn.gate_weight() is not None
        self.act = ffn.act
        self.silu = isinstance(ffn.act, SILU)
        self.d_ff = ffn.d_ff
        self.hidden = ffn.down_weight().shape[0]
        parts = [ffn.gate_weight(), ffn.up_weight()] if self.gated else [ffn.up_weight()]
        self.w_in_t = nn.Parameter(torch.cat([p.detach() for p in parts]).t().contiguous(), requires_grad=False)
        biases = [ffn.gate_bias(), ffn.up_bias()] if self.gated else [ffn.up_bias()]
        self.b_in = None
        if any(b is not None for b in biases):
            zeros = torch.zeros(self.d_ff, device=self.w_in_t.device, dtype=self.w_in_t.dtype)
            self.b_in = nn.Parameter(torch.cat([b.detach() if b is not None else zeros for b in biases]), requires_grad=False)
        self.w_down_t = nn.Parameter(ffn.down_weight().detach().t().contiguous(), requires_grad=False)
        self.projections = dense_projections(ffn)  # the dense projections' names, for bricks that adapt them (`beside`)
        # Customized bricks beside the sparse projections (CPET's LoRA and recovery bricks): a module whose
        # `inputs(x)` adds to the gate|up pre-activations and `output(a)` to the output, read from the full input x
        # and activation a (the sparsity belongs to the compressed projection, not to its bricks).
        self.beside: nn.Module | None = None
        b = ffn.down_bias()
        self.b_down = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)
        # Tokens, then input channels and neurons selected, then those read: the routed and executed fractions.
        # Host ints where the numbers are known there, 0-dim device tensors where they are not (thresholds, masked).
        self.counts = [0, 0, 0, 0, 0]
        # The triton path counts on the device (tokens, inputs, neurons read): no host sync, graph replays counted.
        self._kernel_counts: torch.Tensor | None = None
        self._model_layout: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None  # see `model_layout`
        self._offsets: dict[tuple, torch.Tensor] = {}
        self.keep_in = self.keep_act = 1.0
        self.set_compute(compute)
        self.eval()  # inference until recovery opts in (train mode with gradients selects the masked path)

    # ------------------------------------------------------------------ budget
    def set_full(self) -> None:
        self.set_compute(1.0)

    @property
    def k(self) -> int:
        """Input projections per neuron: 2 for gated FFNs (gate and up), 1 otherwise."""
        return 2 if self.gated else 1

    def set_compute(self, compute: float) -> None:
        """Keep `keep_in` = min(1, 1.2 x compute) of the inputs and spend the rest of `compute` on neurons."""
        if not 0.0 < compute <= 1.0:
            raise BricksError(f"compute fraction must be in (0, 1], got {compute}")
        k = self.k
        keep_in = min(1.0, IN_OVER_COMPUTE * compute)
        keep_act = ((k + 1) * compute - k * keep_in)
        if keep_act * self.d_ff < 1:  # ungated FFNs at tiny budgets: split evenly instead
            keep_in = keep_act = compute
        self.keep_in, self.keep_act = keep_in, min(1.0, keep_act)
        self.thresholds = None  # calibrated for the previous shares

    @torch.no_grad()
    def fit_thresholds(self, x: torch.Tensor) -> tuple[float, float]:
        """Set the threshold selection's magnitudes from sample inputs `x` `[tokens, hidden]`: the `keep_in` share of
        |x| lies above the first, and the `keep_act` share of the activations (of the top-k-masked inputs) above
        the second."""
        x = x.reshape(-1, self.hidden).to(self.w_in_t.dtype)
        h = (x * self._top(x, self.n_in)) @ self.w_in_t
        a = self._activation(h if self.b_in is None else h + self.b_in)

        def above(v: torch.Tensor, share: float) -> float:
            v = v.abs().flatten().float()
            drop = int((1.0 - share) * v.numel())
            return 0.0 if drop == 0 else float(v.kthvalue(drop).values)  # strictly above it: `share` of the values

        self.thresholds = (above(x, self.keep_in), above(a, self.keep_act))
        return self.thresholds

    # Counts round down, so that the compute fraction never exceeds its target (the 1e-6 absorbs float error).
    @property
    def n_in(self) -> int:
        return max(1, int(self.keep_in * self.hidden + 1e-6))

    @property
    def n_act(self) -> int:
        return max(1, int(self.keep_act * self.d_ff + 1e-6))

    @property
    def full(self) -> bool:
        return self.n_in >= self.hidden and self.n_act >= self.d_ff

    def dense_macs_per_token(self) -> int:
        return (self.k + 1) * self.d_ff * self.hidden

    def _macs(self, n_in: float, n_act: float) -> float:
        return self.k * self.d_ff * n_in + self.hidden * n_act

    def compute_fraction(self) -> float:
        """FFN multiply-accumulates per token over dense, as configured (the top-k choice is reported apart, see
        `selection_fraction`: it ranks hidden + d_ff values, with no multiplications)."""
        if self.full:
            return 1.0
        return self._macs(self.n_in, self.n_act) / self.dense_macs_per_token()

    def ranked_per_token(self) -> int:
        return 0 if self.full or self.selection == "threshold" else self.hidden + self.d_ff  # thresholds: no ranking

    def reset_counts(self) -> None:
        self.counts = [0, 0, 0, 0, 0]
        if self._kernel_counts is not None:
            self._kernel_counts.zero_()

    def _count(self, tokens: int, n_in, n_act, ran_in=None, ran_act=None) -> None:
        """Inputs and neurons the routed function selected, and those the path read (the same unless masked)."""
        add = (tokens, n_in, n_act, n_in if ran_in is None else ran_in, n_act if ran_act is None else ran_act)
        self.counts = [c + a for c, a in zip(self.counts, add)]

    def _fraction(self, which: int) -> float | None:
        tokens, n_in, n_act = self.counts[0], self.counts[which], self.counts[which + 1]
        if self._kernel_counts is not None:  # the compiled paths: rows kept, then those multiplied beside them
            kernel = self._kernel_counts.tolist()
            extra = which == 3  # executed: bf16 pairs in the CPU kernel also multiply dropped rows by 0
            tokens = tokens + kernel[0]
            n_in, n_act = n_in + kernel[1] + extra * kernel[3], n_act + kernel[2] + extra * kernel[4]
        if tokens == 0:
            return None
        return self._macs(float(n_in) / tokens, float(n_act) / tokens) / self.dense_macs_per_token()

    def routed_fraction(self) -> float | None:
        return self._fraction(1)

    def executed_fraction(self) -> float | None:
        return self._fraction(3)

    # ------------------------------------------------------------------ execution
    @staticmethod
    def _top(v: torch.Tensor, n: int) -> torch.Tensor:
        """Bool mask of the n largest |v| per row (on the CPU as the kernel chooses them, ties to the lower index:
        torch's topk took longer than the default model's FFN matmuls for a prefill's tokens, bench/README.md)."""
        if cpu_kernels.ranks(v):
            return cpu_kernels.top_magnitudes(v.detach().reshape(-1, v.shape[-1]).contiguous(), n).view(v.shape)
        idx = v.abs().topk(n, dim=-1, sorted=False).indices
        return torch.zeros_like(v, dtype=torch.bool).scatter_(-1, idx, True)

    def _threshold(self, which: int) -> float | None:
        """The calibrated magnitude of inputs (0) or neurons (1) under threshold selection; None under top-k."""
        if self.selection == "topk":
            return None
        if self.thresholds is None:
            raise BricksError("this FFN selects by threshold but is uncalibrated: run "
                              "bricks.routing.calibrate_thresholds(model, windows) (moefy --selection threshold --data ...)")
        return self.thresholds[which]

    def _activation(self, h: torch.Tensor) -> torch.Tensor:
        d = self.d_ff
        act = F.silu if self.silu else self.act  # the function: a module call costs a decode step microseconds
        return act(h[..., :d]) * h[..., d:] if self.gated else act(h)

    # Settings that change what a call's timing key or paths are (`choose_path` keeps them per call shape).
    PLAN_SETTINGS = frozenset({"keep_in", "keep_act", "selection", "thresholds", "beside", "b_in", "dense_fallback"})

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self.PLAN_SETTINGS:
            self.__dict__["_plans"] = {}
        if name == "dense_fallback" and not value:
            self.__dict__["_model_layout"] = None  # the `dense` path's copy of the weights

    def choose_path(self, x: torch.Tensor) -> tuple[str, tuple | None]:
        """`RoutedFFN.choose_path`, with the timing key and the paths of each call shape kept: worked out on every
        call they cost a decode step tens of microseconds per layer (Python with the caches full of weights)."""
        if self.path is not None or x.device.type != "cpu":
            return super().choose_path(x)
        tokens, threads = x.shape[0], torch.get_num_threads()
        plans = self.__dict__.setdefault("_plans", {})
        plan = plans.get((tokens, x.dtype, threads))
        if plan is None:
            paths = self.paths_for(tokens) + (("dense",) if self.dense_fallback else ())
            plan = plans[(tokens, x.dtype, threads)] = (self.timing_key(x), with_serial(paths, threads))
        return base.CHOOSER.choose(plan[0], plan[1]), plan[0]

    @property
    def paths(self) -> tuple[str, ...]:
        """The CPU paths, and `kernel` (`bricks.routing.cpu_kernels`: one compiled call per FFN call) for a gated SiLU
        FFN with nothing added before its activation, once the kernel is built; not for float64, which the kernel
        would sum in fp32."""
        kernel = (self.gated and self.silu and self.b_in is None and self.beside is None
                  and self.w_in_t.dtype != torch.float64 and cpu_kernels.available())
        return self.eager_paths + (("kernel",) if kernel else ())

    def paths_for(self, tokens: int) -> tuple[str, ...]:
        if tokens == 1:
            # Where the kernel is built it is the one-token path (on all threads or on one): the eager paths read
            # the same rows in a dozen operations, and every path the chooser keeps timing costs decode calls on
            # it. `set_path` can still fix any of them.
            paths = self.paths
            return ("kernel",) if "kernel" in paths else paths
        if "kernel" in self.paths:
            # The kernel reads a row once for all the tokens that keep it and skips the others' compute: up to a
            # hundred tokens or so it can beat dense matmuls (see KERNEL_MAX_TOKENS).
            return ("kernel", "masked") if tokens <= KERNEL_MAX_TOKENS else ("masked",)
        # Bags read each token's rows apart: beyond twice the weights in all, one dense pass is sure to win.
        if tokens * self.compute_fraction() > MAX_BAG_READS:
            return ("masked",)
        return ("bags", "masked")

    def static_path(self, tokens: int) -> str:
        if tokens == 1:
            from . import kernels  # imports triton: only off the CPU

            return "triton" if kernels.available(self.w_in_t.device) else "bags"
        return "masked"

    def shape_key(self) -> tuple:
        return self.hidden, self.d_ff, self.k, self.n_in, self.n_act, self.selection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.hidden)
        n = x2.shape[0]
        if self.full:
            y = self._dense(x2)
            self._count(n, n * self.hidden, n * self.d_ff)
        elif self.training and torch.is_grad_enabled():
            y = self._masked(x2)
        else:
            chosen, key = self.choose_path(x2)
            # `dense` on the CPU runs `model_layout`'s copy, made here if needed: not timed as the path's cost.
            copy = self.model_layout() if chosen.startswith("dense") and self.dense_on_copy(x2) else None
            # The kernel runs on one thread by its own argument: changing torch's thread count around each call
            # costs the other operations of a decode step.
            kernel = chosen.startswith("kernel")
            with running(key, chosen, set_threads=not kernel) as path:
                if path == "dense":  # `dense_fallback`: the dense model's function, counted as the whole FFN
                    y = self._dense(x2, copy)
                    self._count(n, n * self.hidden, n * self.d_ff)
                elif path == "triton":
                    y = torch.cat([self._triton(row) for row in x2.split(1)])
                elif kernel:
                    parallel = not chosen.endswith(SERIAL)
                    y = self._kernel(x2, parallel)
                else:
                    y = self._masked(x2) if path == "masked" else self._sparse(x2, split=path == "split")
        return y.reshape(*shape[:-1], self.hidden)

    def _dense(self, x: torch.Tensor, copy: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The whole FFN, on the unit-major weights (at full compute: the distillation teacher's) or on `copy`, the
        dense model's layout (`model_layout`)."""
        a = self._activation(self._pre(x @ self.w_in_t if copy is None else F.linear(x, copy[0]), x))
        return self._post(a @ self.w_down_t if copy is None else F.linear(a, copy[1]), a)

    def model_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`w_in_t` and `w_down_t` as the dense model stores them (`[out, in]`), for the `dense` path on the CPU
        (`RoutedFFN.dense_on_copy` says why): a copy, so that while that path is in use the FFN's weights take twice
        their memory. Made again when the weights change or move; dropped with `dense_fallback`."""
        w_in_t, w_down_t = self.w_in_t, self.w_down_t
        key = (w_in_t.data_ptr(), w_in_t._version, w_down_t.data_ptr(), w_down_t._version, w_in_t.dtype)
        if self._model_layout is None or self._model_layout[0] != key:
            self._model_layout = None  # the old copy goes before the new one is made
            self._model_layout = key, (w_in_t.detach().t().contiguous(), w_down_t.detach().t().contiguous())
        return self._model_layout[1]

    def _pre(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Gate|up pre-activations `h` of inputs `x` plus the input bias and the bricks beside."""
        if self.b_in is not None:
            h = h + self.b_in
        return h if self.beside is None else h + self.beside.inputs(x).to(h.dtype)

    def _post(self, y: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Output `y` of activations `a` plus the output bias and the bricks beside."""
        if self.b_down is not None:
            y = y + self.b_down
        return y if self.beside is None else y + self.beside.output(a).to(y.dtype)

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def write_dense(self, dense: FFN) -> None:
        parts = dense.neuron_parts()
        d = self.d_ff
        rows = self.w_in_t.t()
        names = ["gate", "up"] if self.gated else ["up"]
        for j, name in enumerate(names):
            parts[name].copy_(rows[j * d:(j + 1) * d])
            if self.b_in is not None and f"{name}_bias" in parts:
                parts[f"{name}_bias"].copy_(self.b_in[j * d:(j + 1) * d])
        parts["down"].copy_(self.w_down_t)
        if self.b_down is not None:
            dense.down_bias().copy_(self.b_down)

"""The bricked FFN: an FFN executed brick by brick, optionally only the bricks a router selects.

Storage is brick-major and contiguous, so that a brick's weights are plain
views, never gathered copies:

- `w_in`   `[n_bricks, k*size, hidden]`: per brick its gate rows then its up rows
           (k = 2 for gated FFNs), so one matmul per brick gives both;
- `w_down` `[n_bricks, size, hidden]`: per brick its rows of W_down^T, so that a token's
           down projection sums the rows of the bricks it selected (the CPU kernels do, in
           every dtype), and all bricks at once are one matmul.

Bricks are padded to one size with zero rows (a zero down row contributes
nothing, whatever the activation), which keeps every brick the same shape.
An always-active shared brick (see `BrickSet.shared`) is stored apart and is
computed for every token.

Execution, three paths that compute the same function (`RoutedFFN.paths`; a fourth, `kernel`, runs up to 128
tokens in one compiled call on the CPU, and a fifth, `triton`, a decode token on a GPU: `bricks.routing.brick_kernel`):
`bricks` reads only the selected bricks' weights: one token (batch-1 decode)
in a loop on CPU, several tokens grouped by brick, each brick running once on
its group. `grouped` does the same in two grouped GEMMs
(`torch.nn.functional.grouped_mm`, the brick-major weights as the groups): no
loop, no host sync, what accelerators run (a loop there is launch-bound), and
on CPU one more candidate for batches. `masked` computes every brick in a few
large matmuls and zeroes the unselected ones: what a batch wants, whose tokens
select every brick between them, and what training (recovery: train mode
with gradients) always runs. Which inference path runs on CPU is timed, not
guessed (`bricks.routing.paths`), and the executed fraction counts what ran.
On CUDA, bricks are padded to a multiple of 8 rows: grouped GEMM kernels need
16-byte aligned rows (the zero rows are counted as computed).
At active fraction 1.0 the FFN runs densely in its original neuron order, so
that it reproduces the dense model bit for bit (a brick-wise sum reorders fp32
additions: ~1e-4 on SmolLM2's logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import FFN
from ..errors import BricksError
from .base import RoutedFFN
from .beside import BesideRun, dense_projections
from .brick_counts import BrickCounts
from .brick_dense import DenseView
from .brick_kernel import BrickKernel
from . import cpu_kernels
from .cpu_kernels import KERNEL_MAX_TOKENS
from .paths import running
from .routers import make_router

# Grouped GEMM: public in recent torch, private (CUDA only) before; None where torch has neither.
grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class BrickedFFN(BrickKernel, BrickCounts, DenseView, RoutedFFN):
    """Drop-in replacement of one layer's FFN module, computed brick by brick.

    Args:
        ffn: handle on the dense FFN (weights are copied brick-major).
        assignment: `[d_ff]` brick index of every neuron.
        shared: index of the always-active shared brick, if any.
        router: name of a router in `bricks.routing.ROUTERS` (None: all bricks run).
        active: share of the routed bricks each token runs, in (0, 1].
    """

    eager_paths = ("bricks", "grouped", "masked")  # and `kernel` where it applies (`BrickKernel.paths`)
    device_paths = ("triton",)  # a decode token on a GPU (`BrickKernel._triton`)

    def __init__(self, ffn: FFN, assignment: torch.Tensor, shared: int | None = None, router: str | None = None,
                 active: float = 1.0):
        super().__init__()
        if not 0.0 < active <= 1.0:
            raise BricksError(f"active fraction must be in (0, 1], got {active}")
        assignment = assignment.to(torch.int64).cpu()
        n_all = int(assignment.max()) + 1
        routed = [b for b in range(n_all) if b != shared]
        members = [torch.nonzero(assignment == b).flatten() for b in routed]
        dev, dtype = ffn.down_weight().device, ffn.down_weight().dtype
        align = 8 if dev.type == "cuda" else 1  # 16-byte rows of bf16 for grouped GEMM kernels
        size = -(-max(len(m) for m in members) // align) * align
        hidden = ffn.down_weight().shape[0]
        self.gated = ffn.gate_weight() is not None
        self.act = ffn.act
        self.projections = dense_projections(ffn)  # for bricks beside them (CPET on a MoEfied base)
        self.beside: nn.Module | None = None  # see `bricks.routing.beside`
        self.brick_size = size
        self.d_ff = assignment.numel()
        parts_in = [ffn.gate_weight(), ffn.up_weight()] if self.gated else [ffn.up_weight()]
        bias_in = [ffn.gate_bias(), ffn.up_bias()] if self.gated else [ffn.up_bias()]
        w_down_t = ffn.down_weight().detach().t()  # [d_ff, hidden]

        def pack(rows: torch.Tensor, idx: torch.Tensor, length: int) -> torch.Tensor:
            out = rows.new_zeros(length, *rows.shape[1:])
            out[: len(idx)] = rows[idx.to(rows.device)]
            return out

        self.w_in = nn.Parameter(torch.stack([torch.cat([pack(p.detach(), m, size) for p in parts_in]) for m in members]),
                                 requires_grad=False)  # [n, k*size, hidden]
        self.b_in = None
        if any(b is not None for b in bias_in):
            bias_in = [b if b is not None else torch.zeros(self.d_ff, device=dev, dtype=dtype) for b in bias_in]
            self.b_in = nn.Parameter(torch.stack([torch.cat([pack(b.detach(), m, size) for b in bias_in]) for m in members]),
                                     requires_grad=False)  # [n, k*size]
        w_down = torch.stack([pack(w_down_t, m, size) for m in members])  # [n, size, hidden]
        # Rows in every dtype. bf16/fp16 once stored W_down's columns ([hidden, n, size]), which oneDNN's bf16 matmul
        # takes a little faster, but a batch's down projection then ran densely over every brick: with rows the
        # kernel sums only the selected bricks' (bench/README.md, "Bricks' calls").
        self.w_down = nn.Parameter(w_down, requires_grad=False)
        b = ffn.down_bias()
        self.b_down = None if b is None else nn.Parameter(b.detach().clone(), requires_grad=False)
        self.register_buffer("sizes", torch.tensor([len(m) for m in members], device=dev), persistent=False)
        # Where each stored row came from, to rebuild the dense tensors (-1 = padding).
        self.register_buffer("members", torch.stack([F.pad(m, (0, size - len(m)), value=-1) for m in members]),
                             persistent=False)  # [n, size]
        self.register_buffer("shared_members", torch.nonzero(assignment == shared).flatten() if shared is not None
                             else torch.empty(0, dtype=torch.long), persistent=False)
        self.register_buffer("down_norms", w_down.float().norm(dim=-1), persistent=False)  # [n, size]
        self.shared_in = self.shared_b_in = self.shared_down = None  # the shared brick: dense slices, run for every token
        if shared is not None:
            m = torch.nonzero(assignment == shared).flatten()
            self.shared_in = nn.Parameter(torch.cat([p.detach()[m.to(dev)] for p in parts_in]), requires_grad=False)
            if self.b_in is not None:
                self.shared_b_in = nn.Parameter(torch.cat([b.detach()[m.to(dev)] for b in bias_in]), requires_grad=False)
            sd = w_down_t[m.to(dev)]  # [n_shared, hidden]
            self.shared_down = nn.Parameter(sd.clone(), requires_grad=False)
        self.hidden = hidden
        self.active = active
        self.dense_at_full = True  # False: brick by brick even at full activity (what `verify_bricks` measures)
        self._dense_cache: dict[str, torch.Tensor] | None = None
        # Tokens, bricks the routed function selected, bricks the path ran (all when masked); on the device: no syncs.
        self.register_buffer("counts", torch.zeros(3, dtype=torch.float64, device=dev), persistent=False)
        self.host_counts = [0, 0, 0]  # the same, for the calls on the CPU that count plain numbers (`_count`)
        # Set by recovery with router refit: the masked path then leaves the router's loss in `router_loss`.
        self.refit_router = False
        self.router_loss: torch.Tensor | None = None
        self.router = None if router is None else make_router(router, self)
        self.eval()  # train mode selects the masked training path: only recovery opts in (`model.train()`)

    # ------------------------------------------------------------------ pieces
    @property
    def n_bricks(self) -> int:
        return self.w_in.shape[0]

    @property
    def k_active(self) -> int:
        return max(1, round(self.active * self.n_bricks))

    def _act(self, h: torch.Tensor, size: int) -> torch.Tensor:  # h [..., k*size] -> activations [..., size]
        if self.gated:
            return self.act(h[..., :size]) * h[..., size:]
        return self.act(h)

    def _shared(self, x: torch.Tensor, run: BesideRun | None = None) -> torch.Tensor | None:
        if self.shared_in is None:
            return None
        h = F.linear(x, self.shared_in, self.shared_b_in)
        a = self._act(h if run is None else h + run.shared.to(h.dtype), self.shared_in.shape[0] // (2 if self.gated else 1))
        if run is not None:
            run.put_shared(a)
        return a @ self.shared_down

    def select(self, x: torch.Tensor) -> torch.Tensor | None:
        """Bool mask `[tokens, n_bricks]` of the bricks each token runs (None = all bricks)."""
        if self.k_active >= self.n_bricks:
            return None
        if self.router is None:
            raise BricksError("this bricked FFN has no router: give one (e.g. router='centroid') to run fewer than all bricks")
        return self.router.select(x, self.k_active)

    def set_full(self) -> None:
        self.active, self.dense_at_full = 1.0, True

    @torch.no_grad()
    def refresh(self) -> None:
        self._dense_cache = None
        self.down_norms.copy_(self.w_down.float().norm(dim=-1))
        if self.router is not None:
            self.router.refresh()

    # ------------------------------------------------------------------ execution
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [tokens, hidden]
        if self.k_active >= self.n_bricks and self.dense_at_full:
            y = self._dense(x2)
            n = x2.shape[0] * self.n_bricks
            self._count(x2.shape[0], n, n)
            return y.reshape(*shape[:-1], self.hidden)
        path, key = ("masked", None) if self.training and torch.is_grad_enabled() else self.choose_path(x2)
        # `dense` (`dense_fallback`): the dense model's function, the whole FFN, on the dense model's layout
        # (`_dense_weights`) or every brick on the brick-major storage (`RoutedFFN.dense_on_copy`).
        on_copy = path.startswith("dense") and self.dense_on_copy(x2)
        if on_copy:
            self._dense_weights()  # a copy made now, if needed, is not timed as the path's cost
        elif not self.dense_fallback:
            self._dense_cache = None  # routing again: drop the full-activity copy
        with running(key, path) as path:
            if on_copy:
                y = self._dense(x2)
                n = x2.shape[0] * self.n_bricks
                self._count(x2.shape[0], n, n)
            else:
                sel = None if path == "dense" else self.select(x2)
                if sel is None and path != "dense":
                    sel = torch.ones(x2.shape[0], self.n_bricks, dtype=torch.bool, device=x2.device)
                y = self._run(x2, sel, path)
        return y.reshape(*shape[:-1], self.hidden)

    def paths_for(self, tokens: int) -> tuple[str, ...]:
        kernel = ("kernel",) if tokens <= KERNEL_MAX_TOKENS and self.kernel_applies() else ()
        return (self.eager_paths if self._groups_exactly() else ("bricks", "masked")) + kernel

    def _groups_exactly(self) -> bool:
        """Whether the grouped path applies: a router that picks exactly k bricks per token, grouped GEMMs, and
        rows of whole 16 bytes (what grouped GEMM kernels need; CUDA pads bricks to that, the CPU does not)."""
        size = self.w_in.element_size()
        aligned = (self.hidden * size) % 16 == 0 and (self.brick_size * size) % 16 == 0
        return grouped_mm is not None and aligned and self.router is not None and self.router.exact_k

    def static_path(self, tokens: int) -> str:
        if tokens == 1 and self.triton_applies():
            return "triton"
        if self._groups_exactly() and self.w_in.dtype == torch.bfloat16:  # the dtype of CUDA's grouped GEMMs
            return "grouped"
        return "bricks" if tokens == 1 else "masked"

    def shape_key(self) -> tuple:
        shared = 0 if self.shared_in is None else self.shared_in.shape[0]
        return (self.hidden, self.d_ff, self.n_bricks, self.brick_size, self.k_active, shared,
                None if self.router is None else type(self.router).__name__)

    def _run(self, x2: torch.Tensor, sel: torch.Tensor | None, path: str) -> torch.Tensor:
        masked = path in ("masked", "dense")  # every brick is computed there: executed, all of them
        tokens, n = x2.shape[0], self.n_bricks
        exact = self.router is not None and self.router.exact_k and self.k_active < n  # k per token, no sum needed
        chosen = tokens * n if sel is None else tokens * self.k_active if exact else sel.sum()
        ran = tokens * n if masked else chosen
        if path != "kernel":  # the kernel's count comes after its call: what it multiplied
            self._count(tokens, chosen, ran)
        reuse = self.router is not None and self.router.reuses_gate and self.router.gate is not None
        gate = self.router.gate if reuse else None  # gate pre-activations the router computed
        run = None if self.beside is None else BesideRun(self, x2)
        shared = self._shared(x2, run)
        if masked or path == "kernel":  # these return the routed output: no zeros to add it to
            if masked:
                y = self._masked(x2, sel, run)
            else:
                counts = torch.zeros(2, dtype=torch.int64) if tokens > 1 else None  # a decode token: no tensor op
                y = self._kernel(x2, sel, counts)
                # gate|up (two of a brick's three matrices) ran on the bricks the kernel counts, on AMX for every
                # token of a group of 16 that has one; the down projection on the rows it multiplied, by 0 too where a
                # block of bf16 row pairs ran densely (a decode token: its chosen bricks, both)
                gate_up, down = (chosen, chosen) if counts is None else (int(counts[1]), int(counts[0]) / self.brick_size)
                self._count(tokens, chosen, (2 * gate_up + down) / 3)
            y = y if shared is None else y + shared
        else:  # these add each brick's output into y
            y = x2.new_zeros(x2.shape[0], self.hidden) if shared is None else shared
            self._accumulate(x2, sel, y, gate, run, path)
        if gate is not None:
            self.router.gate = None  # [tokens, d_ff]: not worth keeping
        if run is not None:
            y = y + run.output().to(y.dtype)
        if self.b_down is not None:
            y += self.b_down
        return y

    def _accumulate(self, x2: torch.Tensor, sel: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None,
                    run: BesideRun | None, path: str) -> None:
        """Add the selected bricks' outputs into y on the `grouped`, `triton` or `bricks` path."""
        if path == "grouped":
            self._grouped_mm(x2, sel, y, run)
        elif path == "triton":
            self._triton(x2, sel, y)
        elif x2.shape[0] == 1 and self._gathers(x2):
            self._gathered(x2, sel, y, run)
        elif x2.shape[0] == 1:
            self._decode(x2, sel, y, gate, run)
        else:
            self._grouped(x2, sel, y, gate, run)

    def _brick_act(self, xb: torch.Tensor, b: int, gate: torch.Tensor | None = None, run: BesideRun | None = None,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
        """Activations `[tokens, size]` of brick b on tokens xb (`rows` of the call); `gate`: its gate pre-activations,
        if known; `run`: bricks beside the FFN, whose deltas the pre-activations take and which collect `a`."""
        if run is not None and rows is None:  # one token
            rows = torch.zeros(1, dtype=torch.long, device=xb.device)
        extra = None if run is None else run.bricks[rows, b].to(xb.dtype)  # [tokens, k*size]
        s = self.brick_size
        if gate is None:
            h = F.linear(xb, self.w_in[b], None if self.b_in is None else self.b_in[b])
            a = self._act(h if extra is None else h + extra, s)
        else:
            gate = gate if extra is None else gate + extra[:, :s]
            if self.gated:  # only the up rows are left to compute
                up = F.linear(xb, self.w_in[b, s:], None if self.b_in is None else self.b_in[b, s:])
                a = self.act(gate) * (up if extra is None else up + extra[:, s:])
            else:  # ungated: the router's "gate" rows are the up rows, the activation is complete
                a = self.act(gate)
        if run is not None:
            run.put(rows[:, None], b, a)
        return a

    def _decode(self, x: torch.Tensor, sel: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, run=None) -> None:
        """One token: read only the selected bricks' weights (views of the brick-major storage)."""
        for b in torch.nonzero(sel[0]).flatten().tolist():
            a = self._brick_act(x, b, None if gate is None else gate[:, b], run)
            y.addmm_(a, self.w_down[b])  # accumulate in place: no temporary per brick

    def _gathers(self, x: torch.Tensor) -> bool:  # on accelerators, under a router that picks exactly k bricks
        return x.device.type != "cpu" and self.router is not None and not self.router.reuses_gate

    def _gathered(self, x: torch.Tensor, sel: torch.Tensor, y: torch.Tensor, run: BesideRun | None = None) -> None:
        """One token on an accelerator: the k selected bricks' weights gathered in one op each, no host sync.

        A per-brick loop costs a host sync and several launches per brick, far more than reading the weights on
        a GPU (`bench/README.md`): the k bricks are found on the device (a stable sort of the mask puts them
        first) and gathered into one matmul, at the cost of a copy the CPU path avoids.
        """
        k = self.k_active
        idx = torch.argsort(sel[0].to(torch.int8), descending=True, stable=True)[:k]
        b_in = None if self.b_in is None else self.b_in.index_select(0, idx).flatten()
        h = F.linear(x, self.w_in.index_select(0, idx).flatten(0, 1), b_in).view(1, k, -1)
        a = self._act(h if run is None else h + run.bricks[:, idx].to(h.dtype), self.brick_size)  # [1, k, size]
        if run is not None:
            run.put(torch.zeros(1, 1, 1, dtype=torch.long, device=x.device), idx, a)
        y += a.flatten(1) @ self.w_down.index_select(0, idx).flatten(0, 1)

    def _grouped(self, x: torch.Tensor, sel: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, run=None) -> None:
        """Many tokens: each brick runs once on the tokens that selected it."""
        # All (brick, token) pairs at once, sorted by brick: two host syncs per layer rather than one per brick.
        tokens = sel.t().nonzero()[:, 1]
        for b, rows in enumerate(tokens.split(sel.sum(0).tolist())):
            if len(rows):
                a = self._brick_act(x[rows], b, None if gate is None else gate[rows, b], run, rows)
                y.index_add_(0, rows, a @ self.w_down[b])

    def _grouped_mm(self, x: torch.Tensor, sel: torch.Tensor, y: torch.Tensor, run: BesideRun | None = None) -> None:
        """Every token's k bricks in two grouped GEMMs over the brick-major weights, shapes fixed by (tokens, k):
        no host sync, capturable in a CUDA graph. A brick no token selected is an empty group, whose weights are
        never read."""
        if not self._groups_exactly():
            raise BricksError("the grouped path needs torch's grouped_mm, a router that picks exactly k bricks, and bricks "
                              "whose rows are whole 16 bytes")
        n, k = self.n_bricks, self.k_active
        # Each token's k bricks (a stable sort of the mask puts them first), then the (token, brick) pairs by brick.
        chosen = torch.argsort(sel.to(torch.int8), dim=1, descending=True, stable=True)[:, :k].flatten()
        order = torch.argsort(chosen, stable=True)
        bricks, rows = chosen[order], order // k
        ends = torch.zeros(n, dtype=torch.int32, device=x.device).scatter_add_(
            0, bricks, torch.ones_like(bricks, dtype=torch.int32)).cumsum(0, dtype=torch.int32)
        h = grouped_mm(x[rows], self.w_in.transpose(1, 2), offs=ends)  # [pairs, k*size]
        if self.b_in is not None:
            h = h + self.b_in[bricks]
        a = self._act(h if run is None else h + run.bricks[rows, bricks].to(h.dtype), self.brick_size)
        if run is not None:
            run.put(rows[:, None], bricks, a)
        y.index_add_(0, rows, grouped_mm(a, self.w_down, offs=ends))

    def _masked(self, x: torch.Tensor, sel: torch.Tensor | None, run: BesideRun | None = None) -> torch.Tensor:
        """Every brick computed, the unselected ones zeroed: the function and gradients of the grouped path
        (unselected bricks get zero gradient either way) in a few large matmuls instead of a loop over bricks,
        whose per-brick overheads dominate a batch's forward pass and a training step's backward pass."""
        n, size = self.n_bricks, self.brick_size
        h = F.linear(x, self.w_in.flatten(0, 1), None if self.b_in is None else self.b_in.flatten())
        h = h.view(len(x), n, -1)
        if run is None and self.compiled_activation(h):
            a = cpu_kernels.gated_silu(h, size)  # [tokens, n, size]: every brick's activations
        else:
            a = self._act(h if run is None else h + run.bricks.to(h.dtype), size)
        if self.refit_router and self.router is not None and self.training:
            # The oracle choice of the current weights comes for free here: refit the router towards it.
            with torch.no_grad():
                mass = (a.abs() * self.w_down.norm(dim=-1)).sum(-1).float()
            self.router_loss = self.router.refit_loss(x.detach(), mass, self.k_active)
        if sel is not None:
            a = a * sel[..., None].to(h.dtype)
        if run is not None:
            run.put(torch.arange(len(x), device=x.device)[:, None, None], slice(None), a)
        return a.flatten(1) @ self.w_down.flatten(0, 1)

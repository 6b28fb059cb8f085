"""Many adapter bricks on one base: every sequence of a batch uses its own brick, or its own mix of bricks.

`attach_adapters(model, bricks)` wraps each targeted linear layer once; the
base weights are untouched and shared. All bricks' factors are stacked per
layer (ranks padded with zero rows to the largest rank, scalings folded into
B), so that a batch runs in one forward pass:

- one brick per sequence (`ids`): the sequences are grouped by brick and each
  group goes through its own brick's factors at its own rank (an index_select
  of the group's rows, two thin matmuls, an index_add into the base output), so
  the extra work is the sequences' own low-rank products, each brick's factors
  read once per step;
- a mix per sequence (`weights [batch, n]`) or per token (`[batch, seq, n]`,
  set by a router, see `bricks.adapters.routers`): x is projected on every brick's A at
  once (one matmul with the stacked `[n·r, in]` factors), each brick's block is
  scaled by its weight, and one matmul with the stacked `[out, n·r]` B adds the
  mixture.

Gathering each sequence's factors per step (as Punica/S-LoRA's kernels do on
GPU) copies them once per sequence, which was much slower on CPU
(`bench/README.md`); the grouped path gathers the used bricks' factors once
per `use()`.

    >>> multi = attach_adapters(model, [code_brick, math_brick])
    >>> with multi.use(ids=torch.tensor([0, 1, 1, 0])):
    ...     out = model.generate(batch, max_new_tokens=16)
    >>> multi.detach()
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import BricksError
from .lora import LoRAModule


class MultiLoRALinear(nn.Module):
    """A base linear (or Conv1D) layer plus the stacked factors of several LoRA bricks."""

    def __init__(self, base: nn.Module, modules: list, fan_in_fan_out: bool):
        super().__init__()
        self.base = base
        w = base.weight
        r = max(m.rank for m in modules)
        A = w.new_zeros(len(modules), r, modules[0].A.shape[1])
        B = w.new_zeros(len(modules), modules[0].B.shape[0], r)
        for i, m in enumerate(modules):
            A[i, : m.rank] = m.A.to(w.dtype)
            B[i, :, : m.rank] = (m.B.float() * m.scaling).to(w.dtype)  # the scaling folded into B
        # A and B are in the state dict, so that a training checkpoint of the model holds them as they train.
        self.register_buffer("A", A)  # [n, r, in]
        self.register_buffer("B", B)  # [n, out, r], scaled
        self.register_buffer("A_flat", A.reshape(-1, A.shape[-1]), persistent=False)  # [n*r, in], a view of A
        self.register_buffer("B_flat", B.permute(1, 0, 2).reshape(B.shape[1], -1).contiguous(), persistent=False)  # [out, n*r]
        self.fan_in_fan_out = fan_in_fan_out
        # While the factors train (`MultiAdapter.training_factors`), the flat and grouped copies are derived from
        # A and B in every forward pass so that gradients reach them; otherwise they are cached.
        self.factors_train = False
        # Each sequence's mix ([batch, n]; one-hot for one brick; batch 1 applies to all sequences) or each
        # token's ([batch, seq, n]), set by `MultiAdapter.use` or a router; `gate(x)` computes it from the input.
        self.weights: torch.Tensor | None = None
        self.gate: nn.Module | None = None
        self.slots = self.group_A = self.group_B = self.group_bricks = None  # one brick per sequence, see set_groups
        # Gathered factors by the bricks they hold: a decoding loop routes every step alike (fused specialists
        # call `use()` once per step), and gathering them anew each time would copy every layer's factors.
        self._gathered: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        x3 = x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])
        if self.slots is not None and self.gate is None:
            return self._grouped(x3, y)
        w = self.gate(x3) if self.gate is not None else self.weights
        if w is None:
            return y
        if w.dim() == 2:
            w = w[:, None, :]
        if w.shape[0] not in (1, x3.shape[0]) or w.shape[1] not in (1, x3.shape[1]):
            raise BricksError(f"adapter routing weights {tuple(w.shape)} do not fit the batch {tuple(x3.shape[:2])}")
        n, r = self.A.shape[:2]
        A_flat, B_flat = (self.A.reshape(-1, self.A.shape[-1]), self._b_flat()) if self.factors_train else (self.A_flat, self.B_flat)
        h = x3 @ A_flat.t()  # [b, s, n*r]
        h = (h.view(*h.shape[:2], n, r) * w[..., None].to(h.dtype)).view(h.shape)
        return y + (h @ B_flat.t()).reshape(y.shape).to(y.dtype)

    def _b_flat(self) -> torch.Tensor:
        return self.B.permute(1, 0, 2).reshape(self.B.shape[1], -1)

    def _group_factors(self, bricks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors of the g `bricks`, laid out for batched matmuls: A `[g, in, r]`, B `[g, r, out]`."""
        idx = torch.as_tensor(bricks, device=self.A.device)
        return self.A.index_select(0, idx).transpose(1, 2), self.B.index_select(0, idx).transpose(1, 2)

    @torch.no_grad()
    def refresh(self) -> None:
        """Rebuild the cached copies of the factors after training changed them."""
        self._gathered.clear()
        self.B_flat.copy_(self._b_flat())
        if self.slots is not None and self.group_bricks is not None:
            self.group_A, self.group_B = (t.contiguous() for t in self._group_factors(self.group_bricks))

    def set_groups(self, groups: tuple | None, bricks: list[int] | None) -> None:
        """Route one brick per sequence: `groups` from `MultiAdapter.use` (slots [g, m] of batch rows, the
        positions of real rows among the slots, those rows, the batch size) for the g `bricks`. Their factors
        are gathered once here, not per forward pass."""
        self.group_bricks = bricks
        if groups is None:
            self.slots = self.group_A = self.group_B = None
            return
        self.slots, self.keep, self.keep_rows, self.slot_batch = groups
        self.slot_rows = self.slots.reshape(-1)
        # Rows already in brick order, one slot each (fused specialists: row j is specialist j): no gather, no scatter.
        self.in_order = self.keep is None and torch.equal(self.slot_rows.cpu(), torch.arange(self.slot_batch))
        key = tuple(bricks)
        if self.factors_train or key not in self._gathered:  # training: derived from A and B in each forward
            self._gathered[key] = tuple(t.contiguous() for t in self._group_factors(bricks))  # [g, in, r], [g, r, out]
        self.group_A, self.group_B = self._gathered[key]

    def _grouped(self, x3: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One brick per sequence: each brick's sequences through its own factors, in two batched matmuls.

        x rows are gathered brick by brick into `[g, m·seq, in]` (m: the largest
        group, short groups padded with a repeat of a row), multiplied by the g used
        bricks' A and B (`bmm`), and the products added to the base output of
        their own rows: the extra work is the sequences' own low-rank products.
        """
        b, s, _ = x3.shape
        g, m = self.slots.shape
        if b != self.slot_batch:
            raise BricksError(f"adapter routing for {self.slot_batch} sequences, the batch has {b}")
        # index_select rather than x3[slots]: advanced indexing costs several times more per call, and a decode
        # step makes this call once per adapted layer.
        xg = x3.reshape(g, m * s, -1) if self.in_order else x3.index_select(0, self.slot_rows).view(g, m * s, -1)
        A, B = self._group_factors(self.group_bricks) if self.factors_train else (self.group_A, self.group_B)
        if A.dtype != xg.dtype:
            A, B = A.to(xg.dtype), B.to(xg.dtype)
        d = torch.bmm(torch.bmm(xg, A), B).view(g * m, s, -1)
        if self.in_order:
            return y.add_(d.view(y.shape) if d.dtype == y.dtype else d.view(y.shape).to(y.dtype))
        if self.keep is not None:  # drop the padding's products
            d = d.index_select(0, self.keep)
        y.view(b, s, -1).index_add_(0, self.keep_rows, d if d.dtype == y.dtype else d.to(y.dtype))
        return y


class MultiAdapter:
    """Handle on the adapter bricks attached to a model (see the module docstring)."""

    def __init__(self, model: nn.Module, bricks: list, layers: dict[str, MultiLoRALinear]):
        self.model = model
        self.bricks = bricks
        self.layers = layers

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.bricks]

    @contextlib.contextmanager
    def use(self, ids=None, weights=None):
        """Route the next forward passes: `ids [batch]` (one brick per sequence, -1 = base only) or `weights [batch, n]`."""
        if (ids is None) == (weights is None):
            raise BricksError("give either ids (one brick per sequence) or weights (a mix per sequence)")
        n = len(self.bricks)
        dev = next(iter(self.layers.values())).A.device
        groups = used = None
        if ids is not None:
            ids = torch.as_tensor(ids, dtype=torch.long, device=dev)
            if ids.dim() != 1 or (ids >= n).any() or (ids < -1).any():
                raise BricksError(f"adapter ids must be a 1-d list of values in [-1, {n - 1}]")
            used = sorted({k for k in ids.tolist() if k >= 0})
            if used:
                groups = _slots(ids, used)
        if weights is not None:
            dtype = next(iter(self.layers.values())).A.dtype
            weights = torch.as_tensor(weights, dtype=dtype, device=dev)
            if weights.dim() != 2 or weights.shape[1] != n:
                raise BricksError(f"adapter weights must be [batch, {n}], got {tuple(weights.shape)}")
            if not torch.isfinite(weights).all():
                raise BricksError("adapter weights hold NaN or infinite values")
        for layer in self.layers.values():
            layer.weights = weights
            layer.set_groups(groups, used)
        try:
            yield self.model
        finally:
            for layer in self.layers.values():
                layer.weights = None
                layer.set_groups(None, None)

    @contextlib.contextmanager
    def training_factors(self):
        """Inside the block the stacked factors (A and the scaled B of every layer) are trainable tensors, yielded as
        a list for an optimizer; on exit the trained factors are written back into the bricks (`self.bricks`)."""
        factors = [t for layer in self.layers.values() for t in (layer.A, layer.B)]
        for layer in self.layers.values():
            layer.factors_train = True
        try:
            yield factors
        finally:
            for layer in self.layers.values():
                layer.factors_train = False
                layer.A.requires_grad_(False)
                layer.B.requires_grad_(False)
                layer.refresh()
            self._write_back()

    @torch.no_grad()
    def _write_back(self) -> None:
        for name, layer in self.layers.items():
            for i, brick in enumerate(self.bricks):
                m = brick.modules.get(name)
                if m is not None:  # a brick that does not adapt this layer stays without it
                    m.A = layer.A[i, : m.rank].detach().to(m.A.dtype).cpu().clone()
                    m.B = (layer.B[i, :, : m.rank].float() / m.scaling).to(m.B.dtype).cpu().clone()

    def detach(self) -> nn.Module:
        """Put the plain base layers back; the model is the base model again."""
        named = dict(self.model.named_modules())
        for name, layer in self.layers.items():
            parent, _, child = name.rpartition(".")
            setattr(named[parent] if parent else self.model, child, layer.base)
        self.layers = {}
        return self.model


def _slots(ids: torch.Tensor, used: list[int]) -> tuple:
    """Each used brick's sequences in a row of `slots [g, m]` (-1 in ids, the base alone, takes none); short rows
    are padded with a repeat of their first sequence, whose products are dropped: the slots holding real rows
    (None when all do), those rows, and the batch size."""
    rows = [(ids == k).nonzero().flatten() for k in used]
    m = max(len(r) for r in rows)
    slots = torch.stack([torch.cat([r, r[:1].expand(m - len(r))]) for r in rows])
    real = torch.cat([torch.arange(m, device=ids.device) < len(r) for r in rows])
    keep = None if bool(real.all()) else real.nonzero().flatten()
    flat = slots.reshape(-1)
    return slots, keep, flat if keep is None else flat[keep], len(ids)


def attach_adapters(model: nn.Module, bricks: list) -> MultiAdapter:
    """Attach several adapter bricks (same base, any ranks, any target modules) to `model` for mixed batches."""
    if not bricks:
        raise BricksError("no adapter bricks to attach")
    for b in bricks:
        b.check_model(model)
    targets = sorted(set().union(*(b.modules for b in bricks)))
    named = dict(model.named_modules())
    layers = {}
    for name in targets:
        mods = []
        for b in bricks:
            m = b.modules.get(name)
            if m is None:  # a brick that does not touch this layer: a zero brick of rank 1 here
                ref = next(x.modules[name] for x in bricks if name in x.modules)
                m = LoRAModule(ref.A.new_zeros(1, ref.A.shape[1]), ref.B.new_zeros(ref.B.shape[0], 1), 1.0)
            mods.append(m)
        fan = any(m.fan_in_fan_out for m in mods)
        layer = MultiLoRALinear(named[name], mods, fan)
        parent, _, child = name.rpartition(".")
        setattr(named[parent] if parent else model, child, layer)
        layers[name] = layer
    return MultiAdapter(model, bricks, layers)

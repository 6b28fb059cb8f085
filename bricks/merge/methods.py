"""Merge methods on task vectors, registered by name, with mergekit's parameter names and semantics.

Every method merges one tensor at a time: `merge(method, base, tensors, weights, ...)`,
where `tensors` are the same parameter from each input model and the task
vector of input i is `τ_i = tensors[i] − base`. Parameters (as users write them
in mergekit YAML):

- per input model: `weight` (default 1), `density` (share of τ kept, default 1),
  `gamma` (breadcrumbs: share of largest |τ| removed, default 0.01),
  `epsilon` (DELLA: spread of keep probabilities around density, default 0.15);
- shared: `normalize` (divide by the sum of weights), `rescale` (DARE/DELLA:
  scale a sparsified τ back to its L1 norm, as mergekit 0.1.5 does; the paper's
  1/density is the same in expectation), `lambda` (scales the merged τ),
  `int8_mask` (accepted, no effect on values), `t` (SLERP), `filter_wise` (model stock).

Methods: `linear`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`,
`magnitude_prune` (task arithmetic on magnitude-pruned τ), `breadcrumbs`,
`breadcrumbs_ties`, `della`, `della_linear`, `slerp`, `model_stock`; on the
sphere (`spherical.py`) `nuslerp`, `multislerp`, `karcher`; entry-selecting
(`selective.py`) `nearswap`, `sce`, `arcee_fusion`, `ram`, `ramplus_tl`.
Random methods draw from a `torch.Generator` the caller seeds per tensor, so a
seed reproduces a merge exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BricksError
from ..registry import Registry


METHODS: Registry = Registry("merge method")  # name -> fn(base_of, tensors, model_params, params, generator)

# Parameters each method reads: shared ones, and per-model ones.
SHARED_PARAMS = {"normalize", "rescale", "lambda", "int8_mask", "t", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise",
                 "normalize_weights", "eps", "max_iter", "tol", "select_topk", "r", "alpha"}
MODEL_PARAMS = {"weight", "density", "gamma", "epsilon", "scale"}


# Methods that take the base model when one is given but do not need it (karcher counts it as one more input).
BASE_OPTIONAL = {"linear", "passthrough", "nuslerp", "multislerp", "karcher"}


def needs_base(method: str) -> bool:
    return method not in BASE_OPTIONAL


def is_task_method(method: str) -> bool:
    """Whether `method` sums (sparsified, weighted) task vectors: those need a weight for every model."""
    return isinstance(METHODS.get(method), TaskArithmetic)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def keep_mask(mag: torch.Tensor, kind: str, density: float, gamma: float = 0.01, epsilon: float = 0.15,
              generator: torch.Generator | None = None, scratch: bool = False) -> torch.Tensor:
    """Which entries of τ a sparsification keeps (bool, τ's shape), from their magnitudes |τ|: the largest
    (`magnitude`), at random (`random`, DARE), without outliers (`outliers`, breadcrumbs) or by rank (`della`).
    `scratch`: `mag` may be overwritten (the magnitude sort then runs in place, one tensor less at the peak)."""
    n = mag.numel()
    if density >= 1:
        return torch.ones(mag.shape, dtype=torch.bool, device=mag.device)
    if density <= 0 or n == 0:
        return torch.zeros(mag.shape, dtype=torch.bool, device=mag.device)
    flat = mag.reshape(-1).float()
    if kind == "magnitude":
        # Exactly the k largest |τ|, ties broken by argsort's order as mergekit does: fine-tuning deltas are
        # rounded to the weights' ulp, so equal magnitudes at the cut are common and a threshold would keep more.
        order = torch.empty(n, dtype=torch.int64, device=mag.device)
        torch.sort(flat, descending=True, out=(flat if scratch else torch.empty_like(flat), order))  # argsort's order
        mask = torch.zeros(n, dtype=torch.bool, device=mag.device)
        mask[order[: max(1, int(density * n))]] = True
    elif kind == "outliers":
        keep = int(density * n)
        drop_small = max(0, n - keep - int(gamma * n))  # as many of the largest as possible go too, up to gamma
        mask = torch.zeros(n, dtype=torch.bool, device=mag.device)
        mask[torch.sort(flat).indices[drop_small : drop_small + keep]] = True
    elif kind == "random":
        mask = torch.bernoulli(torch.full((n,), density, dtype=torch.float32, device=mag.device), generator=generator).bool()
    elif kind == "della":
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise BricksError(f"DELLA: epsilon {epsilon} must keep density ± epsilon inside (0, 1) (density {density})")
        rows = mag.reshape(1, -1) if mag.dim() < 2 else mag
        ranks = torch.argsort(torch.argsort(rows, dim=1), dim=1).float() + 1
        lo, hi = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
        norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)  # 0 for the smallest |τ| of a row, 1 for the largest
        norm = torch.where(hi > lo, norm, 0.5)  # a row of one entry (a scalar, an [n, 1] weight): keep at density
        mask = torch.bernoulli((density - epsilon) + 2 * epsilon * norm, generator=generator).bool()
    else:
        raise BricksError(f"unknown sparsification {kind!r}")
    return mask.reshape(mag.shape)


def rescale_factor(mag: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """L1 rescaling after sparsification (mergekit's `rescale`): sum |τ| over sum |kept τ|; None when degenerate."""
    before, after = mag.sum(), (mag * mask).sum()
    if before < 1e-7 or after < 1e-7:
        return None
    return before / after


def sparsify(tau: torch.Tensor, kind: str, density: float, rescale: bool, gamma: float = 0.01, epsilon: float = 0.15,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """τ with only the entries `keep_mask` keeps (L1-rescaled with `rescale`)."""
    if density >= 1:
        return tau
    mag = tau.abs()
    mask = keep_mask(mag, kind, density, gamma, epsilon, generator)
    kept = tau * mask
    factor = rescale_factor(mag, mask) if rescale else None
    return kept if factor is None else kept * factor


SLERP_CHUNK = 1 << 20  # entries per partial norm and partial dot product (summed as mergekit 0.1.5 sums them)


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors (linear when they are nearly collinear), in float32 (float64
    for float64 inputs). Norms and the dot product are sums of per-chunk parts, and the result is
    `c0 * v0 + c1 * v1`: the order of operations of mergekit 0.1.5, so that the results round alike."""
    dtype = _work_dtype(v0)
    a, b = v0.reshape(-1), v1.reshape(-1)
    tt = torch.tensor(float(t), dtype=dtype)
    starts = range(0, a.numel(), SLERP_CHUNK)
    if not a.numel():
        return ((1 - tt) * a.to(dtype) + tt * b.to(dtype)).reshape(v0.shape)

    def norm(x):
        n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x[s : s + SLERP_CHUNK].to(dtype)) for s in starts]))
        return torch.where(n > eps, n, 1)
    na, nb = norm(a), norm(b)
    dot = torch.stack([((a[s : s + SLERP_CHUNK].to(dtype) / na) * (b[s : s + SLERP_CHUNK].to(dtype) / nb)).sum()
                       for s in starts]).sum().clamp(-1, 1)
    linear = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    c0 = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    c1 = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return (c0 * a.to(dtype) + c1 * b.to(dtype)).reshape(v0.shape)


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: interpolate between the base and the average by the mean angle between task vectors."""
    if len(tensors) < 2:
        raise BricksError("model_stock needs at least two models besides the base")
    shape = base.shape
    if filter_wise:
        w0 = base if base.dim() > 1 else base[None]
        ws = [w if w.dim() > 1 else w[None] for w in tensors]
    else:
        w0, ws = base.reshape(-1), [w.reshape(-1) for w in tensors]
    taus = [w - w0 for w in ws]
    cos = [((x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
           for i, x in enumerate(taus) for y in taus[i + 1 :]]
    c = torch.stack(cos).mean(0).unsqueeze(-1)
    k = len(ws)
    denom = 1 + (k - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), k * c / torch.where(singular, torch.ones_like(denom), denom))
    return (t * (sum(ws) / k) + (1 - t) * w0).reshape(shape)


# Pass 2 of a task-vector merge runs in row chunks of about this many entries (8 MB in fp32), so that it
# holds a chunk of each input instead of whole task vectors: its memory no longer grows with the inputs' size.
CHUNK_ENTRIES = 1 << 21


def _row_loader(x):
    """A tensor given directly, as a loader of fresh copies of its rows (loaders get written into)."""
    return lambda rows=None: (x if rows is None else x[rows]).clone()


def _row_chunks(shape: tuple[int, ...]) -> list[slice | None]:
    if len(shape) == 0:
        return [None]
    per_row = max(1, int(torch.Size(shape[1:]).numel()))
    step = max(1, CHUNK_ENTRIES // per_row)
    return [slice(r, min(r + step, shape[0])) for r in range(0, max(shape[0], 1), step)]


def merge(method: str, base, tensors: list, model_params: list[dict],
          params: dict | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Merge one parameter. `model_params[i]` holds input i's `weight`/`density`/...; `params` the shared ones.

    `base` is a tensor or a zero-argument loader of it. `tensors` are tensors, or
    (for the task-vector methods) loaders `load(rows=None)` that return a fresh
    tensor (whole, or the slice `rows` of its first dimension) on every call, so
    that an out-of-core merge holds one whole input at a time, and row chunks of
    all of them when it sums them.

    Returns a tensor of the dtype of the base (or of the first input for `linear`).
    """
    fn = METHODS.get(method)
    if needs_base(method) and base is None:
        raise BricksError(f"merge method {method!r} needs a base model (base_model: ...)")
    base_of = base if callable(base) else (lambda: base)
    if not isinstance(fn, TaskArithmetic):
        tensors = [x() if callable(x) else x for x in tensors]
    return fn(base_of, tensors, model_params, params or {}, generator)


@METHODS.register("linear", "weighted average of the models (https://arxiv.org/abs/2203.05482)")
def _linear(base_of, tensors, model_params, params, generator):
    first = tensors[0]
    dtype = _work_dtype(first)
    w = torch.tensor([float(p.get("weight", 1.0)) for p in model_params], dtype=dtype)
    out = torch.zeros(first.shape, dtype=dtype, device=first.device)
    for x, wi in zip(tensors, w):
        out.add_(x.to(dtype), alpha=float(wi))
    if params.get("normalize", True):
        if abs(float(w.sum())) < 1e-8:
            raise BricksError(f"linear merge with normalize divides by the sum of the weights, which is 0 "
                              f"({[float(x) for x in w]}): change the weights or set normalize: false")
        out /= w.sum()
    return out.to(first.dtype)


@METHODS.register("passthrough", "one model's tensor as it is (with `slices:`, layers stacked from several models)")
def _passthrough(base_of, tensors, model_params, params, generator):
    if len(tensors) != 1:
        raise BricksError(f"passthrough copies exactly one model's tensor, got {len(tensors)}")
    scale = model_params[0].get("scale")
    return tensors[0] if scale is None else (tensors[0].float() * float(scale)).to(tensors[0].dtype)


@METHODS.register("slerp", "spherical interpolation between the base and one model")
def _slerp(base_of, tensors, model_params, params, generator):
    if len(tensors) != 1:
        raise BricksError(f"slerp merges the base with exactly one other model, got {len(tensors)}")
    if "t" not in params:
        raise BricksError("slerp needs the parameter t (0 = base, 1 = the other model)")
    b = base_of()
    return slerp(float(params["t"]), b, tensors[0]).to(b.dtype)


@METHODS.register("model_stock", "interpolation towards the average by the angle between task vectors "
                                 "(https://arxiv.org/abs/2403.19522)")
def _model_stock(base_of, tensors, model_params, params, generator):
    # In the tensors' own dtype, as mergekit 0.1.5 computes it (a bf16 merge rounds as its does).
    b = base_of()
    return model_stock(b, [x.to(b.dtype) for x in tensors], bool(params.get("filter_wise", False))).to(b.dtype)


@dataclass(frozen=True)
class TaskArithmetic:
    """The task-vector family: sparsify each τ, optionally elect signs (TIES), then sum (one class, registered
    once per method with its options, as mergekit's generalized task arithmetic)."""

    sparsify: str | None  # None, "magnitude", "random", "outliers", "della"
    consensus: bool
    normalize: bool  # default of the `normalize` parameter
    rescale: bool  # default of the `rescale` parameter

    def __call__(self, base_of, loaders, model_params, params, generator):
        """Merge one tensor: `loaders` give the models' tensors whole or by rows (see `merge`)."""
        spec = self
        rescale = bool(params.get("rescale", spec.rescale))
        weights = [float(p.get("weight", 1.0)) for p in model_params]
        loaders = [x if callable(x) else _row_loader(x) for x in loaders]
        # Pass 1, one input at a time: which entries each sparsified task vector keeps (1 byte per entry) and its
        # rescale factor. This needs each whole |τ| (the top-k is global); the base is read for it and dropped, so
        # that the sort's temporaries are the only other large tensors alive.
        masks, factors = [], []
        for load, p in zip(loaders, model_params):
            density = float(p.get("density", 1.0))
            if not spec.sparsify or density >= 1:
                masks.append(None)
                factors.append(None)
                continue
            b = base_of()
            mag = load().to(b.dtype).sub_(b).abs_()
            del b
            masks.append(keep_mask(mag, spec.sparsify, density, float(p.get("gamma", 0.01)), float(p.get("epsilon", 0.15)),
                                   generator, scratch=not rescale))
            factors.append(rescale_factor(mag, masks[-1]) if rescale else None)
            del mag

        # Pass 2, chunk by chunk of rows: every operation from here on is element-wise, so the chunks give the
        # same values as whole tensors would. The arithmetic is mergekit's, step for step, so that low-precision
        # merges round as its do: the weights in the tensors' dtype, each sum over the models one reduction
        # (which accumulates in float32 and rounds once), not a running sum rounded at every model.
        b = base_of()
        out = torch.empty_like(b)
        normalize = params.get("normalize", spec.normalize)
        lam = float(params.get("lambda", 1.0))
        w = torch.tensor(weights, dtype=b.dtype, device=b.device)
        for rows in _row_chunks(tuple(b.shape)):
            base_rows = b if rows is None else b[rows]
            deltas = base_rows.new_empty((len(loaders), *base_rows.shape))  # [models, ...]
            for k in range(len(loaders)):
                tau = loaders[k](rows).to(b.dtype).sub_(base_rows)
                if masks[k] is not None:
                    tau.mul_(masks[k] if rows is None else masks[k][rows])
                    if factors[k] is not None:
                        tau.mul_(factors[k])
                deltas[k] = tau
                del tau
            wk = w.view(-1, *[1] * base_rows.dim())
            deltas.mul_(wk)
            if spec.consensus:
                # TIES sign election: the sign of the summed (weighted) task vectors wins, element by element (a
                # zero sum counts as positive); an input counts, in the sum and the divisor, where its sign agrees,
                # and a zero never agrees.
                majority = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).to(deltas.dtype)
                agree = deltas.sign() == majority
                mixed = (deltas * agree).sum(0)
                divisor = (wk * agree).sum(0)
                divisor[divisor == 0] = 1
                del agree
            else:
                mixed = deltas.sum(0)
                divisor = w.sum(0)
                if divisor.abs() < 1e-8:
                    divisor = torch.ones_like(divisor)
            del deltas
            if normalize:
                mixed /= divisor
            if lam != 1:
                mixed *= lam
            out_rows = out if rows is None else out[rows]
            out_rows.copy_(base_rows + mixed)
        return out


for _name, _spec, _summary in (
    ("task_arithmetic", TaskArithmetic(None, False, False, False), "sum of weighted task vectors (https://arxiv.org/abs/2212.04089)"),
    ("magnitude_prune", TaskArithmetic("magnitude", False, False, False), "task arithmetic on magnitude-pruned task vectors"),
    ("ties", TaskArithmetic("magnitude", True, True, False), "magnitude pruning and sign election (https://arxiv.org/abs/2306.01708)"),
    ("dare_linear", TaskArithmetic("random", False, False, True), "random drop and rescale (https://arxiv.org/abs/2311.03099)"),
    ("dare_ties", TaskArithmetic("random", True, False, True), "DARE with TIES sign election"),
    ("breadcrumbs", TaskArithmetic("outliers", False, False, False), "drop the smallest and largest entries (https://arxiv.org/abs/2312.06795)"),
    ("breadcrumbs_ties", TaskArithmetic("outliers", True, False, False), "breadcrumbs with TIES sign election"),
    ("della", TaskArithmetic("della", True, True, True), "magnitude-ranked random drop (https://arxiv.org/abs/2406.11617)"),
    ("della_linear", TaskArithmetic("della", False, False, True), "DELLA without sign election"),
):
    METHODS.add(_name, _spec, _summary)


# Parameters whose values are flags; every other one is a number, with these ranges where it has one.
FLAG_PARAMS = {"normalize", "rescale", "int8_mask", "filter_wise", "nuslerp_flatten", "nuslerp_row_wise", "normalize_weights"}
RANGES = {"density": (0.0, 1.0), "t": (0.0, 1.0), "gamma": (0.0, 1.0), "epsilon": (0.0, 1.0), "select_topk": (0.0, 1.0),
          "eps": (0.0, 1.0), "tol": (0.0, 1.0), "max_iter": (1, 10_000), "r": (0.0, 1e6), "alpha": (0.0, 1e6)}


def check_params(method: str, shared: dict, per_model: list[dict]) -> None:
    """Reject parameters a method does not know, and values of the wrong kind or outside their range, before any
    work. A value may be a scalar or the list of every value a setting can take (a gradient's points)."""
    METHODS.get(method)  # unknown methods: a one-line error listing the known ones
    for key in shared:
        if key not in SHARED_PARAMS | MODEL_PARAMS:
            raise BricksError(f"unknown merge parameter {key!r}: known are {', '.join(sorted(SHARED_PARAMS | MODEL_PARAMS))}")
    for p in per_model:
        for key in p:
            if key not in MODEL_PARAMS | SHARED_PARAMS:
                raise BricksError(f"unknown model parameter {key!r}: known are {', '.join(sorted(MODEL_PARAMS))}")
    for key, value in [*shared.items(), *(kv for p in per_model for kv in p.items())]:
        for v in value if isinstance(value, list) else [value]:
            _check_value(key, v)


def _check_value(key: str, v) -> None:
    if key in FLAG_PARAMS:
        if not isinstance(v, bool):
            raise BricksError(f"{key} is true or false, got {v!r}")
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BricksError(f"{key} must be a number, got {v!r}")
    if v != v or v in (float("inf"), float("-inf")):
        raise BricksError(f"{key} must be a finite number, got {v}")
    lo, hi = RANGES.get(key, (None, None))
    if lo is not None and not lo <= v <= hi:
        raise BricksError(f"{key} must be in [{lo:g}, {hi:g}], got {v}")

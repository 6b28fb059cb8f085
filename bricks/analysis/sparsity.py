"""Activation sparsity, measured as in the Sparsing Law paper (Luo et al. 2024).

A neuron's output on a token is `n_i = a_i · W_down[:, i]`; it is *inactive* when
`||n_i|| < ε`. CETT (cumulative errors of tail truncation) is the relative error
of the FFN output when the inactive neurons are dropped:
`CETT = ||Σ_{inactive} n_i|| / ||Σ_i n_i||`. Every layer gets its own ε so that
all layers share one CETT value; CETT-PPL-p% is the CETT at which perplexity
rises by p%, and the activation ratio at that point is the reported sparsity.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import ffns
from ..runtime import all_reduce_, batches, next_token_targets, progress, run_model
from .capture import ffn_hooks


@torch.no_grad()
def activation_sample(model: nn.Module, ids: torch.Tensor, max_tokens: int = 1024, batch_size: int = 8) -> list[torch.Tensor]:
    """Raw FFN activations `[tokens, d_ff]` per layer for a small calibration set (CPU, fp32)."""
    per_window = max(1, math.ceil(max_tokens / len(ids)))
    stride = max(1, ids.shape[1] // per_window)
    out: list[list[torch.Tensor]] = [[] for _ in ffns(model)]

    def keep(i, a):
        out[i].append(a[:, ::stride].reshape(-1, a.shape[-1]).float().cpu())

    with ffn_hooks(model, keep):
        for rows in batches(len(ids), batch_size, shard=False):  # every process uses the same sample
            run_model(model, ids[rows])
    return [torch.cat(x)[:max_tokens] for x in out]


@dataclass
class CETTCurve:
    """For one layer: CETT and activation ratio as functions of the threshold ε."""

    eps: torch.Tensor  # [k] increasing thresholds on ||n_i||
    cett: torch.Tensor  # [k] mean CETT over calibration tokens
    ratio: torch.Tensor  # [k] share of neurons with ||n_i|| >= ε

    def eps_for(self, target: float) -> float:
        """Threshold whose CETT is `target` (linear interpolation on the monotone curve)."""
        c = torch.cummax(self.cett, 0).values  # CETT is non-decreasing in ε up to sampling noise
        if target <= c[0]:
            return float(self.eps[0])
        if target >= c[-1]:
            return float(self.eps[-1])
        j = int(torch.searchsorted(c, torch.tensor(target)))
        lo, hi = c[j - 1], c[j]
        w = 0.0 if hi == lo else float((target - lo) / (hi - lo))
        return float(self.eps[j - 1] + w * (self.eps[j] - self.eps[j - 1]))

    def ratio_at(self, eps: float) -> float:
        return float(_interp(torch.tensor(eps), self.eps, self.ratio))


def _interp(x, xs, ys):
    j = int(torch.searchsorted(xs, x).clamp(1, len(xs) - 1))
    w = ((x - xs[j - 1]) / (xs[j] - xs[j - 1])).clamp(0, 1) if xs[j] > xs[j - 1] else 0.0
    return ys[j - 1] + w * (ys[j] - ys[j - 1])


@torch.no_grad()
def cett_curve(acts: torch.Tensor, w_down: torch.Tensor, points: int = 32) -> CETTCurve:
    """CETT(ε) on calibration activations `[tokens, d_ff]` for `W_down` `[hidden, d_ff]`."""
    w = w_down.detach().float().cpu()
    norms = w.norm(dim=0)  # [d_ff]
    score = acts.abs() * norms  # ||n_i|| per token and neuron
    full = acts @ w.t()  # [tokens, hidden]
    full_norm = full.norm(dim=1).clamp(min=1e-12)
    # Thresholds at quantiles of the score distribution: dense where the mass is.
    q = torch.linspace(0, 1, points) ** 1.5  # denser at small ε, where CETT-PPL-1% usually lies
    flat = score.flatten()
    sample = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(0))[:200_000]]
    eps = torch.quantile(sample, q).unique()
    cett, ratio = [], []
    for e in eps:
        dropped = score < e
        err = (acts * dropped) @ w.t()
        cett.append(float((err.norm(dim=1) / full_norm).mean()))
        ratio.append(float((~dropped).float().mean()))
    return CETTCurve(eps, torch.tensor(cett), torch.tensor(ratio))


def threshold_hook(eps: torch.Tensor, down_norms: torch.Tensor, counter: dict | None = None):
    """Activation hook that zeroes neurons whose output norm is below the layer's ε."""
    def fn(i, a):
        keep = a.abs() * down_norms[i].to(a.device, a.dtype) >= eps[i]
        if counter is not None:
            counter["active"][i] += float(keep.sum()) / a.shape[-1]
            counter["tokens"][i] += a.numel() / a.shape[-1]
        return a * keep
    return fn


@torch.no_grad()
def thresholded_perplexity(model: nn.Module, ids: torch.Tensor, eps: torch.Tensor, down_norms: list[torch.Tensor],
                           batch_size: int = 8) -> tuple[float, list[float]]:
    """Perplexity of `ids` with every layer's neurons below its threshold `eps` zeroed, and each layer's share
    of active neurons on those tokens."""
    counter = {"active": torch.zeros(len(down_norms), dtype=torch.float64),
               "tokens": torch.zeros(len(down_norms), dtype=torch.float64)}
    ppl = perplexity(model, ids, batch_size, threshold_hook(eps, down_norms, counter))
    all_reduce_(counter["active"]), all_reduce_(counter["tokens"])
    return ppl, (counter["active"] / counter["tokens"].clamp(min=1)).tolist()


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, hook=None, desc: str | None = None,
               mask: torch.Tensor | None = None) -> float:
    """Perplexity of token windows `[n, seq_len]` (data-parallel under accelerate); with `mask` (same shape), of
    the tokens it marks only (chat responses)."""
    nll = torch.zeros(2, dtype=torch.float64)
    ctx = ffn_hooks(model, hook) if hook is not None else contextlib.nullcontext()
    with ctx:
        rows_list = batches(len(ids), batch_size)
        for rows in (progress(rows_list, desc) if desc else rows_list):
            x = ids[rows]
            logits = run_model(model, x, logits=True).float()
            target = next_token_targets(x, None if mask is None else mask[rows], logits.device)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            nll += torch.tensor([float(loss), int((target != -100).sum())], dtype=torch.float64)
    all_reduce_(nll)
    return math.exp(nll[0] / nll[1])


def _next_cett(tried: list[tuple[float, float]], target: float) -> float:
    """Next CETT to try, from a power-law fit of perplexity increase against CETT.

    For small perturbations the loss increase is about quadratic in the relative
    output error, so increase ~ k * CETT^b with b near 2; with two or more
    points b is fitted from the two closest to the target, and the step is
    kept inside the bracket of points already known to lie on either side.
    """
    pos = [(c, i) for c, i in tried if i > 0]
    if len(pos) >= 2:
        (c1, i1), (c2, i2) = sorted(pos, key=lambda t: abs(math.log(t[1] / target)))[:2]
        b = math.log(i2 / i1) / math.log(c2 / c1) if c1 != c2 and i1 != i2 else 2.0
        b = min(max(b, 0.5), 6.0)
    else:
        b = 2.0
    c0, i0 = min(pos, key=lambda t: abs(math.log(t[1] / target))) if pos else (tried[-1][0], 0.0)
    guess = c0 * (target / i0) ** (1 / b) if i0 > 0 else c0 * 2
    below = [c for c, i in tried if i < target]
    above = [c for c, i in tried if i > target]
    lo, hi = (max(below) if below else 0.0), (min(above) if above else 1.0)
    if not lo < guess < hi:
        guess = (lo + hi) / 2
    return guess


@dataclass
class CETTResult:
    """Outcome of the CETT-PPL-p% search."""

    target_increase: float  # p / 100
    cett: float  # the CETT value shared by all layers
    eps: list[float]  # per-layer threshold on ||n_i||
    activation_ratio: list[float]  # per-layer share of active neurons on the evaluation tokens
    ppl_dense: float
    ppl_sparse: float
    search: list[dict] = field(default_factory=list)  # every (cett, ppl, ratio) tried

    @property
    def achieved_increase(self) -> float:
        return self.ppl_sparse / self.ppl_dense - 1

    @property
    def mean_activation_ratio(self) -> float:
        return sum(self.activation_ratio) / len(self.activation_ratio)


@torch.no_grad()
def cett_ppl_search(model: nn.Module, calib_acts: list[torch.Tensor], eval_ids: torch.Tensor, p: float = 1.0,
                    tolerance: float = 0.2, max_steps: int = 12, batch_size: int = 8,
                    ppl_dense: float | None = None) -> tuple[CETTResult, list[CETTCurve]]:
    """Find the CETT whose per-layer thresholds raise perplexity by `p`% (± tolerance·p%).

    Args:
        calib_acts: per-layer activations `[tokens, d_ff]` used to set each layer's ε.
        eval_ids: windows on which perplexity is measured during the search: validation data (the threshold is
            tuned on it; report its effect on held-out data with `thresholded_perplexity`).
    """
    blocks = ffns(model)
    down_norms = [b.down_weight().detach().float().norm(dim=0) for b in blocks]
    curves = [cett_curve(a, b.down_weight()) for a, b in zip(calib_acts, blocks)]
    if ppl_dense is None:
        ppl_dense = perplexity(model, eval_ids, batch_size)
    target = p / 100
    history: list[dict] = []
    best = None
    tried: list[tuple[float, float]] = []  # (cett, increase)
    cett = 0.15  # typical CETT-PPL-1% values are 0.1-0.3
    for _ in progress(range(max_steps), "CETT-PPL search"):
        eps = torch.tensor([c.eps_for(cett) for c in curves])
        ppl, ratio = thresholded_perplexity(model, eval_ids, eps, down_norms, batch_size)
        inc = ppl / ppl_dense - 1
        history.append({"cett": cett, "ppl": ppl, "increase": inc, "mean_activation_ratio": sum(ratio) / len(ratio)})
        if best is None or abs(inc - target) < abs(best[1] - target):
            best = (cett, inc, eps, ratio, ppl)
        if abs(inc - target) <= tolerance * target:
            break
        tried.append((cett, inc))
        cett = _next_cett(tried, target)
    cett, inc, eps, ratio, ppl = best
    result = CETTResult(target, cett, eps.tolist(), ratio, ppl_dense, ppl, history)
    return result, curves

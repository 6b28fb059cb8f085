"""Functional specialization of FFN neurons (Configurable Foundation Models, §4).

FuncScore of a neuron for a domain: the average precision obtained when the
neuron's mean |activation| over a sample's tokens is used to rank samples, the
positives being the samples of that domain. 1.0 = the neuron fires more on every
sample of the domain than on any other; the share of positives = chance.
"""

from __future__ import annotations

import torch
from torch import nn

from .sparsity import perplexity


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Average precision of every column of `scores` `[samples, neurons]` against `labels` `[samples]`.

    Vectorised over neurons; agrees with sklearn's `average_precision_score`
    when scores have no ties.
    """
    labels = labels.bool()
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise ValueError("average precision needs at least one positive sample")
    order = torch.argsort(scores, dim=0, descending=True, stable=True)  # [S, N]
    hits = labels[order].float()  # [S, N]: 1 where the k-th ranked sample is a positive
    ranks = torch.arange(1, scores.shape[0] + 1, dtype=torch.float32)[:, None]
    precision = hits.cumsum(0) / ranks
    return (precision * hits).sum(0) / n_pos


def func_scores(sample_mean: torch.Tensor, sample_domain: torch.Tensor, n_domains: int) -> torch.Tensor:
    """FuncScore `[layers, domains, d_ff]` from per-sample mean |a| `[layers, samples, d_ff]`."""
    return torch.stack([
        torch.stack([average_precision(layer, sample_domain == d) for d in range(n_domains)])
        for layer in sample_mean
    ])


def specialization_summary(scores: torch.Tensor, domains: list[str], threshold: float = 0.8) -> dict:
    """Per layer and domain: best FuncScore and share of neurons above `threshold`."""
    best = scores.max(-1).values  # [layers, domains]
    share = (scores > threshold).float().mean(-1)
    return {
        d: {
            "best": [round(float(x), 4) for x in best[:, k]],
            "share_above": [round(float(x), 5) for x in share[:, k]],
            "layers_best_above": int((best[:, k] > threshold).sum()),
        }
        for k, d in enumerate(domains)
    }


def top_neuron_masks(scores: torch.Tensor, domain: int, fraction: float = 0.05) -> torch.Tensor:
    """`[layers, d_ff]` keep-mask that zeroes each layer's top `fraction` neurons of a domain."""
    k = max(1, round(fraction * scores.shape[-1]))
    top = scores[:, domain].topk(k, dim=-1).indices
    mask = torch.ones(scores.shape[0], scores.shape[-1])
    mask.scatter_(1, top, 0.0)
    return mask


@torch.no_grad()
def ablation_matrix(model: nn.Module, scores: torch.Tensor, eval_windows: list[torch.Tensor], domains: list[str],
                    fraction: float = 0.05, batch_size: int = 8, baseline: list[float] | None = None) -> dict:
    """Perplexity change of every domain when each domain's top neurons are zeroed.

    Returns a dict with `baseline` perplexities and `relative_change[ablated][evaluated]`
    (ppl_ablated / ppl_baseline - 1); specialization is functional when the diagonal dominates.
    """
    if baseline is None:
        baseline = [perplexity(model, w, batch_size) for w in eval_windows]
    change, ppl = [], []
    for k, name in enumerate(domains):
        mask = top_neuron_masks(scores, k, fraction)
        hook = lambda i, a, mask=mask: a * mask[i].to(a.device, a.dtype)  # noqa: E731
        row = [perplexity(model, w, batch_size, hook) for w in eval_windows]
        ppl.append(row)
        change.append([p / b - 1 for p, b in zip(row, baseline)])
    return {"fraction": fraction, "domains": domains, "baseline": baseline, "ablated_ppl": ppl, "relative_change": change}

"""Evaluation of a (possibly configured) model: held-out perplexity per domain, compute fraction, speed."""

from __future__ import annotations

import time

from .analysis.sparsity import perplexity
from .routing import executed_fraction, routed_fraction, selection_fraction


def evaluate(model, domains, batch_size: int = 8) -> dict:
    """Perplexity per domain, FFN compute fractions (1.0 when dense) and tokens/s of the forward passes.

    `compute_fraction` is that of the routed function whose perplexity is measured: the share each token
    selected. `executed_fraction` is what the forward passes ran: a routed FFN runs a batch of full windows as
    dense matmuls on zeroed entries when that is faster than reading each token's share of the weights
    (`bricks.routing.paths`), and counts the whole FFN for them.

    Beside the compute fraction, `selection_fraction` is the cost of choosing what runs (values ranked per
    token by a top-k, over the dense FFN's multiply-accumulates), which the compute fraction does not count.

    Example:
        >>> bricks.evaluate(model, bricks.load_domains(["code=builtin:code"], tok, "heldout"))
    """
    routed_fraction(model, reset=True)
    t = time.perf_counter()
    ppl = {d.name: perplexity(model, d.windows, batch_size, mask=d.loss_mask) for d in domains}
    seconds = time.perf_counter() - t
    tokens = sum(d.windows.shape[0] * d.windows.shape[-1] for d in domains)  # [n, (K,) T]: fused rows counted once
    return {"ppl": ppl, "compute_fraction": routed_fraction(model), "executed_fraction": executed_fraction(model),
            "selection_fraction": selection_fraction(model), "tokens_per_s": tokens / seconds, "tokens": tokens}

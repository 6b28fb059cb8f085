"""Recovery training: fine-tune a bricked model with its routers in the loop.

Routing a SwiGLU FFN to a fraction of its bricks costs far more quality than
the neuron-level oracle suggests (see `notebooks/routing_tradeoffs.ipynb`): the
rest of the network was trained to expect every neuron's contribution. As in
CATS and LLaMA-MoE, a short causal-LM fine-tune of the weights *under the
routed forward pass* lets the model adapt to the bricks its routers pick.

The routers stay frozen (their top-k or threshold choice has no gradient);
every other weight trains: the bricks' stored slices (brick-major, so no
dense copy is made), attention, norms and embeddings. Afterwards what is
derived from the weights (the `centroid` router's centroids, the oracle's down
norms) is rebuilt, so that the model in memory routes as it will once saved
and reloaded.

A fair reading of the result needs the dense model fine-tuned on the same
data for the same steps: fine-tuning alone lowers held-out perplexity on
in-domain data. `bench/routing_recovery.py` measures both.
"""

from __future__ import annotations

import torch

from ..errors import BricksError
from .bricked_ffn import BrickedFFN


def _bricked_layers(model) -> list[BrickedFFN]:
    return [m for m in model.modules() if isinstance(m, BrickedFFN)]


def recover(model, windows: torch.Tensor, steps: int = 200, lr: float = 5e-5, batch_size: int = 8, seed: int = 0,
            log=None) -> dict:
    """Fine-tune a bricked `model` in place on token `windows [n, seq]` with its routers in the loop.

    Trainable routers must already be trained (`train_routers`). AdamW with a
    short warm-up and cosine decay, gradient clipping at 1.0. Returns the
    training report (mean loss of the first and last tenth of the steps).
    Also works on a dense model (no bricked layers): the fair baseline.
    """
    from ..merge.training import adamw_cosine, train_lm

    if windows.numel() == 0:
        raise BricksError("no recovery windows: give training data with at least one window of tokens")
    if steps < 1 or lr <= 0:
        raise BricksError(f"recovery needs steps >= 1 (got {steps}) and lr > 0 (got {lr})")
    layers = _bricked_layers(model)
    for m in layers:
        if m.router is not None and m.router.trainable and not bool(m.router.trained):
            raise BricksError(f"the {m.router.name} router is untrained: train it before recovery (bricks moefy ... --data)")
    routers = {id(p) for m in layers if m.router is not None for p in m.router.parameters()}
    was_training = model.training
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if id(p) not in routers and p.is_floating_point()]
    for p in model.parameters():
        p.requires_grad_(id(p) not in routers and p.is_floating_point())
    for m in layers:
        m._dense_cache = None  # the dense copy would go stale as the bricks train
    opt, sched = adamw_cosine(params, lr, steps)
    model.train()
    try:
        report = train_lm(model, windows, opt, steps, batch_size, seed, "recovery", log, sched=sched, clip=params)
    finally:
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(n, False))
        for m in layers:
            m.refresh()
    report.update({"lr": lr, "batch_size": batch_size, "tokens": steps * min(batch_size, len(windows)) * windows.shape[1]})
    return report

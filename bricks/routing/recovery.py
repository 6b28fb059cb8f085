"""Recovery training: fine-tune a bricked model with its routers in the loop.

Routing a SwiGLU FFN to a fraction of its bricks costs far more quality than
the neuron-level oracle suggests (see `notebooks/routing_tradeoffs.ipynb`): the
rest of the network was trained to expect every neuron's contribution. As in
CATS and LLaMA-MoE, a short causal-LM fine-tune of the weights *under the
routed forward pass* lets the model adapt to the bricks its routers pick.

The routers stay frozen by default (their top-k or threshold choice has no
gradient); with `refit_routers` the MLP routers keep learning alongside, by
their own loss: a binary cross-entropy against the top-k bricks of the
*current* weights, which the training path computes anyway (every brick's
activation), so they follow the bricks as these change. Every other weight
trains: the bricks' stored slices (brick-major, so no
dense copy is made), attention, norms and embeddings. Afterwards what is
derived from the weights (the `centroid` router's centroids, the oracle's down
norms) is rebuilt, so that the model in memory routes as it will once saved
and reloaded.

Two objectives:

- `distill` (default): the routed model learns to match the next-token
  distribution of the dense model it came from (KL(dense || routed) per token,
  the dense model being a frozen copy taken before training). The target is
  the dense model itself, so the recovered model's perplexity is directly
  comparable with the dense one: it cannot gain from in-domain fine-tuning,
  only win back what routing lost. It costs one more (no-grad) forward pass
  per step and a second copy of the weights.
- `lm`: the causal-LM loss on the windows. Cheaper, but fine-tuning alone
  lowers in-domain held-out perplexity, so a fair reading needs the dense model
  fine-tuned the same way as the baseline (`bench/routing_recovery.py`
  measures both).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ..errors import BricksError
from ..training import TrainingCheckpoint, adamw_cosine, lm_loss, train_lm, trainable
from .base import routed_layers
from .bricked_ffn import BrickedFFN


OBJECTIVES = ("distill", "lm")


def dense_teacher(model):
    """A frozen copy of `model` whose routed FFNs all run in full: the dense model it came from."""
    teacher = copy.deepcopy(model)
    for m in routed_layers(teacher):
        m.set_full()
    teacher.eval().requires_grad_(False)
    return teacher


def distill_loss(teacher):
    """`loss_fn(model, x)`: mean per-token KL(teacher || model) of the next-token distributions."""
    def loss_fn(model, x):
        with torch.no_grad():
            target = F.log_softmax(teacher(input_ids=x, use_cache=False).logits.float(), -1).flatten(0, 1)
        logp = F.log_softmax(model(input_ids=x, use_cache=False).logits.float(), -1).flatten(0, 1)
        return F.kl_div(logp, target.to(logp.device), log_target=True, reduction="batchmean")
    return loss_fn


def with_router_refit(loss_fn, layers: list[BrickedFFN], seen: list[float]):
    """`loss_fn` plus the mean router refit loss of the bricked `layers` (recorded in `seen`)."""
    def total(model, x):
        loss = loss_fn(model, x)
        refit = [m.router_loss for m in layers if m.router_loss is not None]
        for m in layers:
            m.router_loss = None
        if not refit:
            return loss
        refit = torch.stack(refit).mean().to(loss.device)
        seen.append(refit.item())
        # The router's loss joins the backward pass but not the value: the reported loss stays the
        # recovery objective alone, comparable with a run without refit.
        return loss + (refit - refit.detach())
    return total


def recover(model, windows: torch.Tensor, steps: int = 200, lr: float = 5e-5, batch_size: int = 8, seed: int = 0,
            log=None, objective: str = "distill", refit_routers: bool = False, router_lr: float = 1e-3,
            checkpoint: str | None = None, checkpoint_every: int = 50) -> dict:
    """Fine-tune a bricked `model` in place on token `windows [n, seq]` with its routers in the loop.

    Trainable routers must already be trained (`train_routers`). AdamW with a
    short warm-up and cosine decay, gradient clipping at 1.0. `objective`:
    `distill` (match the dense model's next-token distribution) or `lm`
    (causal LM loss; also works on a dense model: the fair baseline of an
    `lm` recovery). `refit_routers`: MLP routers train too (learning rate
    `router_lr`), towards the oracle choice of the weights as they are.
    `checkpoint`: a file where the training state is saved every
    `checkpoint_every` steps and at the end; if it exists, training resumes
    from it (the same settings are required). The distillation teacher is
    always the model as given, so resume from the same routed model: the
    source model routed again, not a partly recovered one.
    Returns the training report (mean loss of the first and last tenth of the
    steps, and of the router refit loss).
    """
    if windows.numel() == 0:
        raise BricksError("no recovery windows: give training data with at least one window of tokens")
    if steps < 1 or lr <= 0:
        raise BricksError(f"recovery needs steps >= 1 (got {steps}) and lr > 0 (got {lr})")
    if objective not in OBJECTIVES:
        raise BricksError(f"unknown recovery objective {objective!r}: choose from {', '.join(OBJECTIVES)}")
    routed = routed_layers(model)
    layers = [m for m in routed if isinstance(m, BrickedFFN)]
    if objective == "distill" and not routed:
        raise BricksError("distillation recovery needs a bricked model (a dense model is its own teacher): use objective='lm'")
    for m in layers:
        if m.router is not None and m.router.trainable and not bool(m.router.trained):
            raise BricksError(f"the {m.router.name} router is untrained: train it before recovery (bricks moefy ... --data)")
    saver = None if checkpoint is None else TrainingCheckpoint(checkpoint, checkpoint_every)
    refit = [m for m in layers if refit_routers and m.router is not None and m.router.refits]
    if refit_routers and not refit:
        raise BricksError("no router here learns by gradient (refit works for mlp and hybrid routers): drop refit_routers")
    if refit_routers and router_lr <= 0:
        raise BricksError(f"router refit needs router_lr > 0 (got {router_lr})")
    routers = {id(p) for m in layers if m.router is not None for p in m.router.parameters()}
    router_params = [p for m in refit for p in m.router.parameters() if p.is_floating_point()]
    params = [p for p in model.parameters() if id(p) not in routers and p.is_floating_point()]
    for m in layers:
        m._dense_cache = None  # the dense copy would go stale as the bricks train
    loss_fn = distill_loss(dense_teacher(model)) if objective == "distill" else lm_loss
    refit_seen: list[float] = []
    if refit:
        loss_fn = with_router_refit(loss_fn, layers, refit_seen)
    groups = [{"params": params}] + ([{"params": router_params, "lr": router_lr}] if router_params else [])
    opt, sched = adamw_cosine(groups, lr, steps)
    with trainable(model, params + router_params):
        model.train()
        for m in refit:
            m.refit_router = True
        try:
            report = train_lm(model, windows, opt, steps, batch_size, seed, "recovery", log, sched=sched,
                              clip=params, loss_fn=loss_fn,  # routers unclipped: their BCE would set the scale
                              checkpoint=saver, settings={"objective": objective, "lr": lr, "refit_routers": refit_routers,
                                                          "router_lr": router_lr,
                                                          "compute": [round(m.compute_fraction(), 6) for m in routed]})
        finally:
            for m in layers:
                m.refit_router, m.router_loss = False, None
            for m in routed:
                m.refresh()
    report.update({"objective": objective, "lr": lr, "batch_size": batch_size, "tokens": steps * min(batch_size, len(windows)) * windows.shape[1]})
    if refit:
        tenth = max(1, len(refit_seen) // 10)
        report.update({"router_refit": True, "router_lr": router_lr, "router_loss_first": sum(refit_seen[:tenth]) / tenth,
                       "router_loss_last": sum(refit_seen[-tenth:]) / tenth})
    return report

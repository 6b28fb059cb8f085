"""The one training loop and what it needs: optimizer and schedule, a loss, resumable checkpoints, `trainable`.

LoRA bricks, adapter gates, MoE gates and recovery training all run
`train_lm`: random batches of token windows (seeded), one optimizer step per
batch, a non-finite loss stops it, and with a `TrainingCheckpoint` an
interrupted run resumes to the weights an uninterrupted one would have.
Under `accelerate launch` (N processes) each process runs its share of every
batch and the gradients are summed across processes, so the run trains the
weights one process would (`tests/test_distributed.py`).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch

from .errors import BricksError
from .runtime import all_reduce_, input_device, world

def adamw_cosine(params, lr: float, steps: int):
    """AdamW (no weight decay) with a short warm-up then cosine decay: stable for the few hundred steps used here."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def lm_loss(model, x: torch.Tensor, mask: torch.Tensor | None = None, **forward) -> torch.Tensor:
    """The causal LM loss of token batch `x` under `model`; with `mask`, only the tokens it marks are targets."""
    labels = x if mask is None else x.masked_fill(~mask.to(x.device), -100)
    return model(input_ids=x, labels=labels, use_cache=False, **forward).loss


class TrainingCheckpoint:
    """Where a long training run saves its state every `every` steps, and resumes from after an interruption.

    One file, replaced atomically at each save: the model's state dict (weights and routers), the optimizer and
    scheduler states, the batch sampler's generator, the losses so far and the run's settings. Resuming
    restores all of it, so an interrupted run that resumes ends with the weights an uninterrupted one would
    have; a file written by a run with other settings is refused, not mixed in. The file is kept after the
    last step (rerunning then only reloads the result); delete it once the trained model is saved.
    """

    def __init__(self, path: str | os.PathLike, every: int = 50):
        if every < 1:
            raise BricksError(f"checkpoint interval must be >= 1 step, got {every}")
        self.path, self.every = Path(path), every

    def resume(self, model, opt, sched, gen: torch.Generator, settings: dict) -> tuple[int, list[float]]:
        """Load the saved state into the training objects if the file exists: (steps done, their losses)."""
        if not self.path.exists():
            return 0, []
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            saved = state["settings"]
        except Exception as exc:
            raise BricksError(f"cannot read training checkpoint {self.path} ({exc}): delete it to start over") from exc
        if saved != settings:
            diff = ", ".join(f"{k}={saved.get(k)!r} there, {settings.get(k)!r} here" for k in sorted(set(saved) | set(settings))
                             if saved.get(k) != settings.get(k))
            raise BricksError(f"training checkpoint {self.path} is from another run ({diff}): "
                              "rerun with its settings, or give another checkpoint path")
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise BricksError(f"training checkpoint {self.path} does not fit this model ({first}): "
                              "give the checkpoint of this model's run, or another path") from exc
        opt.load_state_dict(state["optimizer"])
        if sched is not None:
            sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        return state["step"], list(state["losses"])

    def save(self, model, opt, sched, gen: torch.Generator, settings: dict, step: int, losses: list[float]) -> None:
        # The whole model state, not only what trains: frozen routers then come back as they were, even where
        # rebuilding them would not be deterministic.
        weights = {n: t.cpu() for n, t in model.state_dict().items()}
        state = {"settings": settings, "step": step, "losses": losses, "model": weights, "optimizer": opt.state_dict(),
                 "scheduler": None if sched is None else sched.state_dict(), "generator": gen.get_state()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.path)  # an interruption while saving leaves the previous checkpoint intact
        finally:
            tmp.unlink(missing_ok=True)


def train_lm(model, windows: torch.Tensor, opt, steps: int, batch_size: int = 8, seed: int = 0, name: str = "model",
             log=None, sched=None, clip=None, loss_fn=None, checkpoint: TrainingCheckpoint | None = None,
             settings: dict | None = None, groups: list[int] | None = None, loss_mask: torch.Tensor | None = None,
             **forward) -> dict:
    """The language-model training loop of LoRA bricks, adapter gates and MoE routers: random batches of token
    `windows` (seeded), causal LM loss (`forward` adds model arguments; `loss_fn(model, x)` replaces the loss),
    one optimizer step per batch; a non-finite loss stops it. Reports the mean loss of the first and the last
    tenth of the steps. With a `checkpoint`, the state is saved every `checkpoint.every` steps and at the end,
    and a run resumes from it; `settings` (e.g. the learning rate) join the loop's own in the check that the
    checkpoint belongs to this run. `groups`: `windows` is that many consecutive blocks of these sizes (one per
    domain), and every batch takes the same number of windows from each (a class-balanced sampler). `loss_mask`
    (the windows' shape): only the tokens it marks are targets (chat responses); `loss_fn` then gets it as `mask`."""
    gen = torch.Generator().manual_seed(seed)
    dev = input_device(model)
    rank, size = world()
    if size > 1 and batch_size < size:
        raise BricksError(f"a batch of {batch_size} cannot be shared by {size} processes: give --batch-size >= {size}")
    start, losses = 0, []
    if checkpoint is not None:
        settings = {"name": name, "steps": steps, "batch_size": batch_size, "seed": seed, "windows": list(windows.shape),
                    **(settings or {})}
        start, losses = checkpoint.resume(model, opt, sched, gen, settings)
        if start and log is not None:
            log(f"{name}: resumed at step {start}/{steps} from {checkpoint.path}")
    for step in range(start, steps):
        # Every process draws the same batch (one generator, one seed) and takes its share of the rows; the
        # gradients summed over processes are then those of the whole batch, so N processes train as one does.
        rows = _batch_rows(len(windows), batch_size, gen, groups)
        mine = rows[rank::size]
        x = windows[mine].to(dev)
        mask = {} if loss_mask is None else {"mask": loss_mask[mine].to(dev)}
        loss = lm_loss(model, x, **mask, **forward) if loss_fn is None else loss_fn(model, x, **mask)
        share = len(mine) / len(rows)
        whole = all_reduce_(loss.detach().float() * share)  # the whole batch's loss, the same in every process
        if not torch.isfinite(whole):
            raise BricksError(f"{name} training diverged at step {step + 1} (loss {whole.item()}): lower the learning rate")
        opt.zero_grad(set_to_none=True)
        (loss * share).backward()
        if size > 1:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        all_reduce_(p.grad)
        loss = whole
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        if log is not None and rank == 0 and (step % max(1, steps // 10) == 0 or step == steps - 1):
            log(f"{name}: step {step + 1}/{steps} loss {loss.item():.3f}")
        if checkpoint is not None and rank == 0 and ((step + 1) % checkpoint.every == 0 or step == steps - 1):
            checkpoint.save(model, opt, sched, gen, settings, step + 1, losses)  # the same state in every process
    tenth = max(1, steps // 10)
    return {"steps": steps, "loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth}


def _batch_rows(n: int, batch_size: int, gen: torch.Generator, groups: list[int] | None) -> torch.Tensor:
    """Rows of one batch: uniform over all windows, or as many from each group (balanced)."""
    if groups is None:
        return torch.randint(n, (min(batch_size, n),), generator=gen)
    if sum(groups) != n or min(groups) < 1:
        raise BricksError(f"balanced batches need non-empty groups that cover the {n} windows, got sizes {groups}")
    per = max(1, batch_size // len(groups))
    starts = [sum(groups[:i]) for i in range(len(groups))]
    return torch.cat([start + torch.randint(size, (per,), generator=gen) for start, size in zip(starts, groups)])


@contextlib.contextmanager
def trainable(model, params=()):
    """Inside the block only `params` require gradients: every parameter of `model` is frozen first.

    On exit, whatever happened inside, every parameter's `requires_grad` (of
    `model` and of `params`, which may live outside it, e.g. a router's gates)
    and the model's train/eval mode are as they were before.

    Example:
        >>> with trainable(model, gate.parameters()):
        ...     train_lm(model, windows, opt, steps)
    """
    params = list(params)
    saved = [(p, p.requires_grad) for p in [*model.parameters(), *params]]
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield params
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)

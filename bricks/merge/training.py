"""Training small LoRA adapters with PEFT, returned as adapter bricks.

Enough to make customized bricks to combine (the merging notebook trains one
per built-in domain in a few minutes on CPU); it is not a replacement for a
fine-tuning framework. PEFT does the training so that the bricks are real PEFT
adapters: the brick is read back from PEFT's own saved directory.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from ..analysis.capture import input_device
from ..errors import BricksError
from .adapters import AdapterBrick

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train_lora(model, windows: torch.Tensor, name: str = "adapter", rank: int = 16, alpha: float | None = None,
               targets=DEFAULT_TARGETS, steps: int = 100, lr: float = 1e-3, batch_size: int = 8, seed: int = 0,
               rslora: bool = False, log=None) -> tuple[AdapterBrick, dict]:
    """Train a LoRA adapter on token `windows [n, seq]` (causal LM loss); the model is left unchanged.

    Returns the brick and a report (loss of the first and last tenth of the steps).
    """
    from peft import LoraConfig, get_peft_model

    if windows.numel() == 0:
        raise BricksError("no training windows: give data with at least one window of tokens")
    if rank < 1 or steps < 1 or lr <= 0:
        raise BricksError(f"rank ({rank}) and steps ({steps}) must be >= 1 and lr ({lr}) > 0")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise BricksError(f"target modules {missing} do not exist in this model; choose among its linear layers")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, target_modules=list(targets),
                        lora_dropout=0.0, bias="none", use_rslora=rslora, task_type="CAUSAL_LM")
    # Taken before PEFT freezes the base, so that the model comes back as it was.
    was_training = model.training
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(seed)  # PEFT initialises A with the global generator
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt, sched = adamw_cosine(params, lr, steps)
    peft_model.train()
    try:
        report = train_lm(peft_model, windows, opt, steps, batch_size, seed, name, log, sched=sched, clip=params)
        peft_model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            peft_model.save_pretrained(tmp, safe_serialization=True)
            brick = AdapterBrick.from_peft(tmp, name=name)
    finally:
        peft_model.unload()  # back to the plain base modules, weights untouched
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(n, p.requires_grad))
    report.update({"name": name, "rank": rank, "tokens": steps * min(batch_size, len(windows)) * windows.shape[1]})
    return brick, report


def adamw_cosine(params, lr: float, steps: int):
    """AdamW (no weight decay) with a short warm-up then cosine decay: stable for the few hundred steps used here."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def lm_loss(model, x: torch.Tensor, **forward) -> torch.Tensor:
    """The causal LM loss of token batch `x` under `model`."""
    return model(input_ids=x, labels=x, use_cache=False, **forward).loss


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
             settings: dict | None = None, **forward) -> dict:
    """The language-model training loop of LoRA bricks, adapter gates and MoE routers: random batches of token
    `windows` (seeded), causal LM loss (`forward` adds model arguments; `loss_fn(model, x)` replaces the loss),
    one optimizer step per batch; a non-finite loss stops it. Reports the mean loss of the first and the last
    tenth of the steps. With a `checkpoint`, the state is saved every `checkpoint.every` steps and at the end,
    and a run resumes from it; `settings` (e.g. the learning rate) join the loop's own in the check that the
    checkpoint belongs to this run."""
    gen = torch.Generator().manual_seed(seed)
    dev = input_device(model)
    start, losses = 0, []
    if checkpoint is not None:
        settings = {"name": name, "steps": steps, "batch_size": batch_size, "seed": seed, "windows": list(windows.shape),
                    **(settings or {})}
        start, losses = checkpoint.resume(model, opt, sched, gen, settings)
        if start and log is not None:
            log(f"{name}: resumed at step {start}/{steps} from {checkpoint.path}")
    for step in range(start, steps):
        x = windows[torch.randint(len(windows), (min(batch_size, len(windows)),), generator=gen)].to(dev)
        loss = lm_loss(model, x, **forward) if loss_fn is None else loss_fn(model, x)
        if not torch.isfinite(loss):
            raise BricksError(f"{name} training diverged at step {step + 1} (loss {loss.item()}): lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(clip, 1.0)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        if log is not None and (step % max(1, steps // 10) == 0 or step == steps - 1):
            log(f"{name}: step {step + 1}/{steps} loss {loss.item():.3f}")
        if checkpoint is not None and ((step + 1) % checkpoint.every == 0 or step == steps - 1):
            checkpoint.save(model, opt, sched, gen, settings, step + 1, losses)
    tenth = max(1, steps // 10)
    return {"steps": steps, "loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth}

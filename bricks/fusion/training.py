"""Training a fused model as UltraFuser does: the gate alone first, then gate and specialists together.

Loss: cross-entropy of the fused logits on every next token of plain-text
windows, and on the response tokens only of chat examples (as the paper).
Batches are class-balanced by default: the same number of windows from every
domain (the paper's balanced sampler); `balanced=False` samples
windows in proportion to the data. Stage 1 trains the gate with the
specialists frozen (they run without gradients); stage 2 trains the gate with
the specialists: their LoRA factors for adapter specialists (written back into
their bricks afterwards), their full weights for model specialists. Training
is resumable through a `TrainingCheckpoint` file per stage.

    >>> report = train_fusion(fused, train_domains, stage1_steps=400, lr=2e-5)
    >>> gate_shares(fused, heldout_domains)    # mean gate weight per domain and specialist
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..errors import BricksError
from ..runtime import batches, next_token_targets
from ..training import TrainingCheckpoint, adamw_cosine, train_lm, trainable
from .model import FusedModel, ModelSpecialists


class FuseConfig(BaseModel):
    """Settings of `bricks fuse` (flags and YAML files share this schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stage1_steps: int = Field(100, ge=0)  # gate alone, specialists frozen
    stage2_steps: int = Field(0, ge=0)  # gate and specialists together (LoRA factors, or full weights)
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False)
    stage2_lr: float = Field(1e-5, gt=0, allow_inf_nan=False)
    batch_size: int = Field(6, ge=1)
    balanced: bool = True  # the same number of windows from every domain in each batch
    width: int = Field(512, ge=1)  # the gate's hidden width
    windows: int = Field(64, ge=1)  # train windows per domain
    eval_windows: int = Field(16, ge=1)  # held-out windows per domain
    seq_len: int = Field(128, ge=2)
    seed: int = 0


def fused_loss(model: FusedModel, x: torch.Tensor, specialists_grad: bool = False,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of the fused logits on token windows `x [B, T]` (on the tokens `mask` marks)."""
    logits = model(x, specialists_grad=specialists_grad).logits[:, :-1].float()
    return F.cross_entropy(logits.flatten(0, 1), next_token_targets(x, mask, logits.device).flatten())


def train_fusion(fused: FusedModel, domains, stage1_steps: int = 100, stage2_steps: int = 0, lr: float = 1e-3,
                 stage2_lr: float = 1e-5, batch_size: int = 6, balanced: bool = True, seed: int = 0, log=None,
                 checkpoint: str | None = None, checkpoint_every: int = 50) -> dict:
    """Stage 1 (gate) then stage 2 (gate and model specialists) on token windows of named `domains` (train split).

    `checkpoint`: a path prefix; each stage saves its state to `PREFIX.stageN` every `checkpoint_every` steps and
    a rerun with the same settings resumes from it. Returns the training report per stage (mean loss of the
    first and last tenth of the steps, settings).
    """
    if not domains or any(d.windows.numel() == 0 for d in domains):
        raise BricksError("fusion training needs token windows for every domain: give --data NAME=SOURCE")
    if stage1_steps < 0 or stage2_steps < 0 or stage1_steps + stage2_steps == 0:
        raise BricksError(f"give stage-1 and/or stage-2 steps (>= 0, not both 0), got {stage1_steps} and {stage2_steps}")
    if lr <= 0 or stage2_lr <= 0 or batch_size < 1:
        raise BricksError(f"learning rates must be > 0 and batch size >= 1 (got {lr}, {stage2_lr}, {batch_size})")
    if any(d.windows.dim() == 3 for d in domains):  # per-specialist chat rows: text windows read alike by all
        k = len(fused.names)
        windows = torch.cat([d.windows if d.windows.dim() == 3 else d.windows[:, None].expand(-1, k, -1)
                             for d in domains])
    else:
        windows = torch.cat([d.windows for d in domains])
    masks = None
    if any(d.loss_mask is not None for d in domains):  # chat data somewhere: plain-text domains score every token
        masks = torch.cat([d.loss_mask if d.loss_mask is not None else torch.ones_like(d.windows, dtype=torch.bool)
                           for d in domains])
    groups = [len(d.windows) for d in domains] if balanced else None
    report = {"balanced": balanced, "domains": [d.name for d in domains]}
    for stage, steps, rate in ((1, stage1_steps, lr), (2, stage2_steps, stage2_lr)):
        if not steps:
            continue
        with contextlib.ExitStack() as stack:
            params = list(fused.gate.parameters())
            if stage == 2 and isinstance(fused.specialists, ModelSpecialists):
                params += [p for m in fused.specialists.models for p in m.parameters() if p.is_floating_point()]
            elif stage == 2:  # the stacked LoRA factors, written back into the bricks when the block ends
                params += stack.enter_context(fused.specialists.multi.training_factors())
            opt, sched = adamw_cosine(params, rate, steps)
            saver = None if checkpoint is None else TrainingCheckpoint(f"{checkpoint}.stage{stage}", checkpoint_every)
            with trainable(fused, params):
                fused.train()
                report[f"stage{stage}"] = train_lm(
                    fused, windows, opt, steps, batch_size, seed + stage, f"fusion stage {stage}", log, sched=sched,
                    clip=params, loss_fn=lambda m, x, s=stage, **mask: fused_loss(m, x, s == 2, **mask),
                    checkpoint=saver, settings={"lr": rate, "balanced": balanced, "stage": stage}, groups=groups,
                    loss_mask=masks)
        report[f"stage{stage}"]["lr"] = rate
    fused.eval()
    return report


@torch.no_grad()
def gate_shares(fused: FusedModel, domains, batch_size: int = 4) -> dict[str, dict[str, float]]:
    """Mean gate weight of each specialist over the tokens of each domain: `{domain: {specialist: weight}}`."""
    shares = {}
    for d in domains:
        total, tokens = torch.zeros(len(fused.names), dtype=torch.float64), 0
        for rows in batches(len(d.windows), batch_size, shard=False):
            w = fused(d.windows[rows]).weights  # [B, K, T]
            total += w.double().sum((0, 2)).cpu()
            tokens += w.shape[0] * w.shape[2]
        shares[d.name] = {n: round(float(v / max(tokens, 1)), 4) for n, v in zip(fused.names, total)}
    return shares

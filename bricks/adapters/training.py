"""Training small LoRA adapters with PEFT, returned as adapter bricks.

Enough to make customized bricks to combine (the merging notebook trains one
per built-in domain in a few minutes on CPU); it is not a replacement for a
fine-tuning framework. PEFT does the training so that the bricks are real PEFT
adapters: the brick is read back from PEFT's own saved directory.
"""

from __future__ import annotations

import tempfile

import torch

from ..errors import BricksError
from ..training import adamw_cosine, train_lm, trainable
from .lora import AdapterBrick

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train_lora(model, windows: torch.Tensor, name: str = "adapter", rank: int = 16, alpha: float | None = None,
               targets=DEFAULT_TARGETS, steps: int = 100, lr: float = 1e-3, batch_size: int = 8, seed: int = 0,
               rslora: bool = False, log=None, loss_mask: torch.Tensor | None = None) -> tuple[AdapterBrick, dict]:
    """Train a LoRA adapter on token `windows [n, seq]` (causal LM loss; with `loss_mask`, of the tokens it marks,
    e.g. a chat domain's responses); the model is left unchanged.

    Returns the brick and a report (loss of the first and last tenth of the steps).

    Example:
        >>> brick, report = train_lora(model, domain.windows, "code", rank=16, steps=150)
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
    # `trainable` is entered before PEFT freezes the base, so that the model comes back as it was.
    with trainable(model):
        torch.manual_seed(seed)  # PEFT initialises A with the global generator
        peft_model = get_peft_model(model, config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt, sched = adamw_cosine(params, lr, steps)
        peft_model.train()
        try:
            report = train_lm(peft_model, windows, opt, steps, batch_size, seed, name, log, sched=sched, clip=params,
                              loss_mask=loss_mask)
            peft_model.eval()
            with tempfile.TemporaryDirectory() as tmp:
                peft_model.save_pretrained(tmp, safe_serialization=True)
                brick = AdapterBrick.from_peft(tmp, name=name)
        finally:
            peft_model.unload()  # back to the plain base modules, weights untouched
    report.update({"name": name, "rank": rank, "tokens": steps * min(batch_size, len(windows)) * windows.shape[1]})
    return brick, report

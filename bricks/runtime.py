"""Where and how a model runs: devices, the data-parallel world, batches, forward passes, progress.

Shared by analysis, training and routing: one process or several under
`accelerate launch` / `torchrun` (each takes a shard of the rows, statistics
are summed across processes), CPU or accelerators, no KV cache.
"""

from __future__ import annotations

import atexit
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm  # not tqdm.auto: its notebook bars need ipywidgets, and warn without it


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) unless running under `accelerate launch` / torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> None:
    """Join the process group when started by `accelerate launch --multi_gpu` or `torchrun`.

    Works on CPU too (gloo backend): `accelerate launch --multi_gpu --num_processes 2`
    starts the processes through torchrun whether or not a GPU is present.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        # Left to the interpreter's own teardown, gloo's worker threads could outlive it and abort the process
        # (SIGABRT, "terminate called without an active exception") after its work was done: one CI run lost
        # test_distributed that way. atexit handlers run while the interpreter is still whole.
        atexit.register(leave_distributed)


def leave_distributed() -> None:
    """Leave the process group joined by `init_distributed` (registered to run at exit; safe to call twice)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: str | None) -> str | None:
    """With several processes on one machine, `cuda` means this process's own GPU."""
    if device == "cuda" and world()[1] > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum a statistic over data-parallel processes, in place (no-op when alone)."""
    if world()[1] > 1:
        dist.all_reduce(t)
    return t


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go, also for models dispatched with device_map."""
    return model.get_input_embeddings().weight.device


def batches(n: int, batch_size: int, shard: bool = True) -> list[range]:
    """Row ranges of batches; with `shard`, this process's share of the rows."""
    rank, size = world() if shard else (0, 1)
    mine = list(range(rank, n, size))
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def next_token_targets(x: torch.Tensor, mask: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """The targets of logits `[:, :-1]` over token batch `x`: `x[:, 1:]`, with -100 (ignored by cross-entropy)
    where `mask` (`[B, T]`, e.g. chat responses) does not mark the token. `x` `[B, K, T]` holds one row per fused
    specialist (`bricks.data.chat_examples`): the scored tokens are the same in every row, the first gives them."""
    if x.dim() == 3:
        x = x[:, 0]
    target = x[:, 1:].to(device if device is not None else x.device)
    if mask is not None:
        target = target.masked_fill(~mask[:, 1:].to(target.device), -100)
    return target


def run_model(model: nn.Module, ids: torch.Tensor, logits: bool = False):
    """Forward pass without KV cache; skips the LM head when logits are not needed."""
    ids = ids.to(input_device(model))
    if logits:
        return model(input_ids=ids, use_cache=False).logits
    # The decoder stack alone: the LM head (a large share of a small model's
    # FLOPs) is not needed to see FFN activations.
    return model.get_decoder()(input_ids=ids, use_cache=False)


class Timeline:
    """One lasting line on stderr per finished step of a long command, with its time, so that a log keeps the
    record (progress bars vanish when done). Rank 0 only."""

    def __init__(self, command: str):
        self.command, self.last = command, time.perf_counter()

    def done(self, what: str) -> None:
        now = time.perf_counter()
        if world()[0] == 0:
            print(f"{self.command}: {what} ({now - self.last:.0f} s)", file=sys.stderr, flush=True)
        self.last = now


def progress(iterable, desc: str, total: int | None = None):
    rank, _ = world()
    # disable=None: a bar on a terminal only (not in logs or notebooks, where Timeline lines keep the record).
    return tqdm(iterable, desc=desc, total=total, disable=True if rank != 0 else None, leave=False, dynamic_ncols=True)

"""Greedy decoding with a static KV cache, each step captured once in a CUDA graph and replayed.

Batch-1 decoding on a GPU launches hundreds of small kernels per token, and
on a 7B model their launch overhead rivals the time they run. Replaying a
captured graph launches a whole step at once. TEAL timed its sparse kernels
that way (torch.compile's "reduce-overhead" mode), so dense and routed models
are compared here in the same setting: `bench/bench_decode.py --device cuda`.

A step reads and writes only fixed device buffers (the token, its position,
the attention mask over the static cache, the generated tokens), so a replay
needs no input from the host; tokens come back once, at the end. On CPU (or
with `graphs=False`) the same step runs eagerly: that is what the tests check
against `model.generate`.

    >>> decoder = GreedyDecoder(model, max_len=128)
    >>> new = decoder(ids, new_tokens=32)        # [1, 32]
"""

from __future__ import annotations

import functools
import inspect
import time

import torch
from torch import nn
from transformers import StaticCache

from .errors import BricksError


def cache_keyword(model: nn.Module) -> str:
    """The KV cache's keyword in `model.forward`: transformers renamed `past_key_values` to `cache` (the old name
    warns, and goes in 5.40), while the older releases this project supports know only the old one."""
    return _cache_keyword(type(model))


@functools.cache
def _cache_keyword(cls: type) -> str:  # once per model class, not at every decoding step
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


class GreedyDecoder:
    """Greedy batch-1 decoding of `model` up to `max_len` positions (prompt and new tokens).

    Args:
        model: a causal LM whose forward takes `position_ids`, `cache_position`, a 4D attention mask and a
            KV cache (every decoder family transformers ships).
        graphs: capture the step in a CUDA graph (default: when the model is on a CUDA device).
        warmup: eager steps before the capture (lazy allocations, kernel autotuning); they decode real tokens.
    """

    def __init__(self, model: nn.Module, max_len: int, graphs: bool | None = None, warmup: int = 3):
        self.model = model
        self.max_len = max_len
        self.device = next(model.parameters()).device
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise BricksError("CUDA graphs need a model on a CUDA device: decode with graphs=False elsewhere")
        self.warmup = warmup
        self.timed: tuple[int, float] | None = None  # (steps, seconds) of the last call's timed steps

    def tokens_per_s(self) -> float:
        """Decoding speed of the last call, over the steps after the prefill (and, with graphs, after the warm-up
        and capture): the replays alone."""
        steps, seconds = self.timed
        return steps / seconds

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """The `new_tokens` greedy continuations of the prompt `ids` `[1, P]`, as `[1, new_tokens]`."""
        prompt = ids.shape[1]
        if ids.shape[0] != 1 or prompt + new_tokens > self.max_len or new_tokens < 1:
            raise BricksError(f"greedy decoding takes one prompt of at most {self.max_len - new_tokens} tokens "
                              f"for {new_tokens} new ones (got {tuple(ids.shape)})")
        dev = self.device
        cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
        kw = {cache_keyword(self.model): cache}
        logits = self.model(ids.to(dev), use_cache=True, **kw).logits
        # The step's buffers: the token fed in, its position, the mask of cache slots it attends to, the output.
        token = logits[:, -1].argmax(-1, keepdim=True)
        pos = torch.tensor([prompt], device=dev)
        mask = torch.zeros(1, 1, 1, self.max_len, dtype=torch.bool, device=dev)
        mask[..., :prompt] = True
        out = torch.zeros(self.max_len, dtype=torch.long, device=dev)
        out[prompt] = token[0, 0]

        def step():
            mask.index_fill_(-1, pos, True)  # the new token attends to itself and everything before it
            logits = self.model(input_ids=token, position_ids=pos[None], cache_position=pos, attention_mask=mask,
                                use_cache=True, **kw).logits
            nxt = logits[:, -1].argmax(-1)
            token.copy_(nxt[:, None])
            pos.add_(1)
            out.index_copy_(0, pos, nxt)

        steps = new_tokens - 1
        run = step
        if self.graphs and steps > self.warmup:
            run = self._capture(step).replay
            steps -= self.warmup
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            run()
        sync()
        self.timed = (steps, time.perf_counter() - start)
        return out[None, prompt:prompt + new_tokens].cpu()

    def _capture(self, step) -> torch.cuda.CUDAGraph:
        return capture_graph(step, self.warmup)


def capture_graph(fn, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """`fn()` captured in a CUDA graph, after `warmup` calls on a side stream (as capture requires: lazy
    allocations, kernel autotuning); the warm-up calls run, the captured one runs at each `replay()`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()  # recorded, not run
    return graph

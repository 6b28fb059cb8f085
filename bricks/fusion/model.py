"""Specialists fused by a token-level gate (UltraFuser, Ding et al. 2024, https://arxiv.org/abs/2403.08281).

K specialist models read the same tokens side by side. A gate `g`, one small
network shared by all specialists (Linear(d, 512) -> ReLU -> Linear(512, 1)),
scores each specialist's own last hidden state; per token the weights are
`w = softmax_k g(h_k)` and the fused next-token logits are `sum_k w_k * logits_k`
(pre-softmax logits are mixed; hidden states only feed the gate).
Specialists whose hidden sizes differ get their own first gate layer.

Two kinds of specialists:

- `AdapterSpecialists`: K adapter bricks on one base. All K run in one batched
  forward of the base, each specialist one row of the batch (the many-adapter
  path of `bricks.adapters.multi`), so a decode step reads the base weights
  once, not K times.
- `ModelSpecialists`: K full models (one architecture and vocabulary), each
  with its own KV cache, stepped together: K times one model's cost, as in the
  paper's serving.

    >>> fused = FusedModel(AdapterSpecialists(base, [code, math, prose]))
    >>> out = fused(ids)                     # out.logits [B, T, V], out.weights [B, K, T]
    >>> fused.generate(ids, max_new_tokens=16)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.multi import attach_adapters
from ..decoding import cache_keyword
from ..errors import BricksError


@dataclass
class SpecialistOutput:
    hidden: list[torch.Tensor]  # per specialist, last hidden state [B, T, d_k]
    logits: torch.Tensor  # [B, K, T, V]
    past: object = None  # the KV cache(s) to continue from


class AdapterSpecialists(nn.Module):
    """K adapter bricks on one base model, run as K rows of one batch."""

    kind = "adapters"

    def __init__(self, base: nn.Module, bricks: list):
        super().__init__()
        if not bricks:
            raise BricksError("fusion needs at least one specialist")
        names = [b.name for b in bricks]
        if len(set(names)) != len(names):
            raise BricksError(f"specialist names must be unique, got {names}")
        self.multi = attach_adapters(base, bricks)
        self.base = base
        self.names = names
        self.hidden_sizes = [base.get_input_embeddings().weight.shape[1]] * len(bricks)
        self._linear_head: bool | None = None  # see `head_is_linear`

    @property
    def models(self) -> list[nn.Module]:
        return [self.base]

    @contextlib.contextmanager
    def _rows(self, ids: torch.Tensor):
        """The batch rows `[B*K, T]` (row b*K + j: sequence b under specialist j, from `ids` `[B, T]` or each
        specialist's own row of `[B, K, T]`), with each row's adapter selected while the block runs."""
        k = len(self.names)
        with self.multi.use(ids=torch.arange(k).repeat(ids.shape[0])):
            yield ids.flatten(0, 1) if ids.dim() == 3 else ids.repeat_interleave(k, dim=0)

    def forward(self, ids: torch.Tensor, past=None, use_cache: bool = False) -> SpecialistOutput:
        """`ids` `[B, T]`, or `[B, K, T]`: each specialist's own row (its chat template)."""
        b, k = ids.shape[0], len(self.names)
        with self._rows(ids) as rows:
            out = self.base(input_ids=rows, **{cache_keyword(self.base): past}, use_cache=use_cache,
                            output_hidden_states=True)
        h = out.hidden_states[-1].view(b, k, *out.hidden_states[-1].shape[1:])
        return SpecialistOutput([h[:, j] for j in range(k)], out.logits.view(b, k, *out.logits.shape[1:]),
                                out.past_key_values if use_cache else None)

    def hidden(self, ids: torch.Tensor, past=None, use_cache: bool = False) -> SpecialistOutput:
        """The specialists' last hidden states without their logits (the decoder alone; `logits` is None)."""
        b, k = ids.shape[0], len(self.names)
        decoder = self.base.get_decoder()
        with self._rows(ids) as rows:
            out = decoder(input_ids=rows, **{cache_keyword(decoder): past}, use_cache=use_cache)
        h = out.last_hidden_state.view(b, k, *out.last_hidden_state.shape[1:])
        return SpecialistOutput([h[:, j] for j in range(k)], None, out.past_key_values if use_cache else None)

    @torch.no_grad()
    def head_is_linear(self) -> bool:
        """Whether the logits are the shared output head applied to the last hidden state, and nothing else: then
        the fused logits `sum_k w_k head(h_k)` are `head(sum_k w_k h_k)`, one head row instead of K. Checked once,
        numerically on a few tokens; a soft-capped head (Gemma-2: near-linear on small logits, so the check could
        not see it) or an adapter on the head is not shared."""
        if self._linear_head is None:
            head = self.base.get_output_embeddings()
            adapted = any(name.split(".")[-1] == "lm_head" or layer.base is head for name, layer in self.multi.layers.items())
            capped = getattr(self.base.config, "final_logit_softcapping", None) is not None
            if adapted or capped or head is None:
                self._linear_head = False
            else:
                ids = torch.arange(4, device=head.weight.device)[None] % head.weight.shape[0]
                full = self.base(input_ids=ids, use_cache=False).logits
                mine = head(self.base.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state)
                self._linear_head = full.shape == mine.shape and bool(torch.allclose(full, mine, rtol=1e-4, atol=1e-5))
        return self._linear_head


class ModelSpecialists(nn.Module):
    """K full models with one vocabulary, each with its own KV cache, stepped together."""

    kind = "models"

    def __init__(self, models: list[nn.Module], names: list[str]):
        super().__init__()
        if not models:
            raise BricksError("fusion needs at least one specialist")
        vocab = {m.get_output_embeddings().weight.shape[0] for m in models}
        if len(vocab) > 1:
            raise BricksError(f"the specialists' vocabularies differ in size ({sorted(vocab)}): fusion mixes their "
                              "next-token logits, so they need one tokenizer")
        if len(set(names)) != len(names):
            raise BricksError(f"specialist names must be unique, got {names}")
        self.specialists = nn.ModuleList(models)
        self.names = list(names)
        self.hidden_sizes = [m.get_input_embeddings().weight.shape[1] for m in models]

    @property
    def models(self) -> list[nn.Module]:
        return list(self.specialists)

    def forward(self, ids: torch.Tensor, past=None, use_cache: bool = False) -> SpecialistOutput:
        """`ids` `[B, T]`, or `[B, K, T]`: each specialist's own row (its chat template)."""
        outs = [m(input_ids=ids[:, j] if ids.dim() == 3 else ids, **{cache_keyword(m): None if past is None else past[j]},
                  use_cache=use_cache, output_hidden_states=True) for j, m in enumerate(self.specialists)]
        return SpecialistOutput([o.hidden_states[-1] for o in outs], torch.stack([o.logits for o in outs], 1),
                                [o.past_key_values for o in outs] if use_cache else None)


def chat_templates(tokenizers: list) -> list | None:
    """The specialists' tokenizers when their chat templates differ (each frames prompts its own way), else None."""
    return list(tokenizers) if len({getattr(t, "chat_template", None) for t in tokenizers}) > 1 else None


class FusionGate(nn.Module):
    """`g(h_k)`: Linear(d_k, width) -> ReLU -> Linear(width, 1); the first layer shared when all d_k are equal."""

    def __init__(self, hidden_sizes: list[int], width: int = 512):
        super().__init__()
        self.shared_first = len(set(hidden_sizes)) == 1
        firsts = 1 if self.shared_first else len(hidden_sizes)
        self.first = nn.ModuleList(nn.Linear(hidden_sizes[j], width) for j in range(firsts))
        self.second = nn.Linear(width, 1)
        # Zero scores at the start: the untrained fused model is the specialists' uniform logit average (the
        # simple alternative a user would try first), and training learns where to deviate from it.
        nn.init.zeros_(self.second.weight)
        nn.init.zeros_(self.second.bias)
        self.n = len(hidden_sizes)

    def forward(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """Per-token weights `[B, K, T]` that sum to 1 over the K specialists."""
        scores = [self.second(torch.relu(self.first[0 if self.shared_first else j](h.to(self.second.weight.dtype))))
                  for j, h in enumerate(hidden)]  # each [B, T, 1]
        return torch.softmax(torch.cat(scores, -1), -1).permute(0, 2, 1)


@dataclass
class FusedOutput:
    logits: torch.Tensor  # [B, T, V]
    weights: torch.Tensor  # [B, K, T]
    past: object = None


class FusedModel(nn.Module):
    """Specialists plus a token-level gate: fused next-token logits (see the module docstring)."""

    def __init__(self, specialists: AdapterSpecialists | ModelSpecialists, gate: FusionGate | None = None,
                 width: int = 512):
        super().__init__()
        self.specialists = specialists
        self.gate = gate if gate is not None else FusionGate(specialists.hidden_sizes, width)
        if self.gate.n != len(specialists.names):
            raise BricksError(f"a gate for {self.gate.n} specialists cannot fuse {len(specialists.names)}")
        ref = next(specialists.models[0].parameters())
        self.gate.to(ref.device)
        # Full-model specialists whose chat templates differ: one tokenizer each, to frame chat prompts with
        # (`bricks.data.load_domains(..., templates=)`); None when all read the same template.
        self.chat_templates: list | None = None

    @property
    def names(self) -> list[str]:
        return self.specialists.names

    def get_input_embeddings(self) -> nn.Module:  # where input ids go (`bricks.runtime.input_device`)
        return self.specialists.models[0].get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, past=None, use_cache: bool = False,
                specialists_grad: bool = False) -> FusedOutput:
        """`input_ids` `[B, T]`, or `[B, K, T]` with each specialist's own row (`bricks.data.chat_examples`:
        prompts in their own chat templates, responses aligned). `specialists_grad`: let gradients reach the
        specialists (stage 2); otherwise they run without."""
        one_head = isinstance(self.specialists, AdapterSpecialists) and self.specialists.head_is_linear()
        with torch.set_grad_enabled(specialists_grad and torch.is_grad_enabled()):
            out = (self.specialists.hidden if one_head else self.specialists)(input_ids, past, use_cache)
        w = self.gate(out.hidden)  # [B, K, T]
        if one_head:  # the head is linear and shared: mix the hidden states, then one head row per token
            mixed = sum(w[:, j, :, None].to(h.dtype) * h for j, h in enumerate(out.hidden))
            return FusedOutput(self.specialists.base.get_output_embeddings()(mixed), w, out.past)
        logits = (w[..., None].to(out.logits.dtype) * out.logits).sum(1)
        return FusedOutput(logits, w, out.past)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int = 16, use_cache: bool = True, eos_token_id=None) -> torch.Tensor:
        """Greedy decoding of the fused model; with `use_cache` each specialist keeps its KV cache. `ids` `[B, T]`, or
        `[B, K, T]` (each specialist's prompt in its own template): every row continues with the fused tokens."""
        out, past, step = ids, None, ids
        for _ in range(max_new_tokens):
            res = self(step if use_cache else out, past=past, use_cache=use_cache)
            nxt = res.logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            if ids.dim() == 3:
                nxt = nxt[:, None].expand(-1, ids.shape[1], -1)  # the same token for every specialist's row
            out = torch.cat([out, nxt], -1)
            past, step = res.past, nxt
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
        return out

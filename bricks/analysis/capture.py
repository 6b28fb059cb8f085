"""Activation capture on the FFN neuron axis, with hooks that always clean up.

The neuron activation vector of an FFN is the input of its output projection
(down_proj / fc2 / c_proj) in every supported family, so one forward pre-hook
per layer sees `a = act(gate(x)) * up(x)` (or `act(fc1(x))`) as `[batch, pos, d_ff]`.
The same hook point serves interventions: a hook that returns a tensor replaces
the activations (ablation, thresholding, bricks switched off).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..arch import FFN, decoder_layers, ffns
from ..runtime import all_reduce_, batches, progress, run_model

# fn(layer_index, activations [batch, pos, d_ff]) -> None (observe) or a tensor (replace)
ActivationFn = Callable[[int, torch.Tensor], "torch.Tensor | None"]


@contextlib.contextmanager
def ffn_hooks(model: nn.Module, fn: ActivationFn, layers: Sequence[int] | None = None) -> Iterator[list[FFN]]:
    """Call `fn` on every selected layer's FFN activations during forward passes.

    The hooks are removed when the block exits, whatever happens inside it.

    Example:
        >>> with ffn_hooks(model, lambda i, a: a * mask[i]):   # ablate neurons
        ...     logits = model(ids).logits
    """
    blocks = ffns(model)
    chosen = range(len(blocks)) if layers is None else layers
    handles = []
    # Some families (OPT) flatten tokens to [batch*pos, d_ff] inside the block;
    # the block's input tells the [batch, pos] shape to restore.
    shape: dict[int, torch.Size] = {}
    layer_modules = decoder_layers(model)
    try:
        for i in chosen:
            def remember(module, args, kwargs, i=i):
                h = args[0] if args else kwargs.get("hidden_states")
                shape[i] = h.shape[:2]

            def hook(module, args, i=i):
                a = args[0]
                flat = a.ndim == 2
                if flat:
                    a = a.view(*shape[i], a.shape[-1])
                out = fn(i, a)
                if out is None:
                    return None
                return (out.reshape(args[0].shape) if flat else out, *args[1:])

            if not blocks[i].layout.mlp:
                handles.append(layer_modules[i].register_forward_pre_hook(remember, with_kwargs=True))
            handles.append(blocks[i].down.register_forward_pre_hook(hook))
        yield blocks
    finally:
        for h in handles:
            h.remove()


class NeuronStats:
    """Streaming per-neuron statistics over many tokens; memory independent of the token count.

    Args:
        n_layers, d_ff: shape of the neuron axis.
        domains: domain names; each sample (token window) belongs to one.
        sample_domain: `[n_samples]` domain index of every sample.
        thresholds: `[n_layers]` threshold on a neuron's output norm |a_i|·||W_down[:, i]||
            above which it counts as active (Sparsing Law); None means a != 0 (ReLU models).
        down_norms: `[n_layers, d_ff]` column norms of W_down (needed with thresholds).
        coactivation: also count how often each pair of neurons is active together.
        coactivation_stride: count co-activation on every k-th token only (it is the
            one O(d_ff^2) statistic; a few thousand tokens give a stable estimate).
    """

    def __init__(self, n_layers: int, d_ff: int, domains: list[str], sample_domain: torch.Tensor,
                 thresholds: torch.Tensor | None = None, down_norms: torch.Tensor | None = None,
                 coactivation: bool = True, coactivation_stride: int = 8):
        self.domains = list(domains)
        self.sample_domain = sample_domain.long()
        n_samples, n_domains = len(sample_domain), len(domains)
        self.thresholds = thresholds
        self.down_norms = down_norms
        self.coactivation_stride = coactivation_stride
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731  (sums of many tokens)
        self.tokens = z(n_domains)  # tokens seen per domain
        self.coact_tokens = z(1)
        self.active = z(n_layers, d_ff)  # tokens on which the neuron is active
        self.abs_sum = z(n_layers, n_domains, d_ff)  # sum of |a| per domain
        self.sample_mean = torch.zeros(n_layers, n_samples, d_ff)  # mean |a| over each sample's tokens
        self.coact = torch.zeros(n_layers, d_ff, d_ff) if coactivation else None
        self._samples: torch.Tensor | None = None
        self._norms_on: dict[int, torch.Tensor] = {}

    def set_batch(self, sample_ids: Sequence[int], tokens_per_sample: int) -> None:
        """Declare which samples the next forward pass holds."""
        self._samples = torch.as_tensor(list(sample_ids))
        d = self.sample_domain[self._samples]
        self.tokens.index_add_(0, d, torch.full((len(d),), float(tokens_per_sample), dtype=torch.float64))
        if self.coact is not None:
            self.coact_tokens += len(d) * len(range(0, tokens_per_sample, self.coactivation_stride))

    def is_active(self, layer: int, a_abs: torch.Tensor) -> torch.Tensor:
        if self.thresholds is None:
            return a_abs > 0
        return a_abs * self._down_norm(layer, a_abs.device) >= self.thresholds[layer]

    def _down_norm(self, layer: int, device) -> torch.Tensor:
        """W_down column norms of a layer on `device`, moved there once rather than every batch."""
        if self._norms_on.get(layer) is None or self._norms_on[layer].device != device:
            self._norms_on[layer] = self.down_norms[layer].to(device)
        return self._norms_on[layer]

    @torch.no_grad()
    def update(self, layer: int, acts: torch.Tensor) -> None:
        a = acts.detach().float().abs()  # [batch, pos, d_ff]
        active = self.is_active(layer, a)
        self.active[layer] += active.sum((0, 1)).double().cpu()
        per_sample = a.mean(1).cpu()  # [batch, d_ff]
        self.sample_mean[layer, self._samples] = per_sample
        d = self.sample_domain[self._samples]
        self.abs_sum[layer].index_add_(0, d, (per_sample * a.shape[1]).double())
        if self.coact is not None:
            b = active[:, :: self.coactivation_stride].reshape(-1, a.shape[-1]).float()  # [tokens, d_ff]
            if self.coact.device == b.device:
                self.coact[layer].addmm_(b.t(), b)  # in place: no [d_ff, d_ff] temporary per batch
            else:
                self.coact[layer] += (b.t() @ b).cpu()

    def reduce(self) -> "NeuronStats":
        """Sum statistics over data-parallel processes (each saw a different shard)."""
        for t in (self.tokens, self.coact_tokens, self.active, self.abs_sum, self.sample_mean, self.coact):
            if t is not None:
                all_reduce_(t)
        return self

    # ---- derived quantities
    @property
    def n_tokens(self) -> float:
        return float(self.tokens.sum())

    def activation_frequency(self) -> torch.Tensor:
        """[n_layers, d_ff] share of tokens on which each neuron is active."""
        return (self.active / max(self.n_tokens, 1)).float()

    def mean_abs(self) -> torch.Tensor:
        """[n_layers, d_ff] mean |a| over all tokens."""
        return (self.abs_sum.sum(1) / max(self.n_tokens, 1)).float()

    def domain_mean_abs(self) -> torch.Tensor:
        """[n_layers, n_domains, d_ff] mean |a| per domain."""
        return (self.abs_sum / self.tokens.clamp(min=1)[None, :, None]).float()


@torch.no_grad()
def capture_stats(model: nn.Module, domains, batch_size: int = 8, thresholds: torch.Tensor | None = None,
                  coactivation: bool = True, coactivation_stride: int = 8, desc: str = "capturing activations") -> NeuronStats:
    """Run every domain's windows through the model and accumulate `NeuronStats`.

    Args:
        domains: list of `bricks.data.Domain` (token windows per named domain).
        thresholds: per-layer activity thresholds (see `NeuronStats`); None = a != 0.

    Under `accelerate launch`, each process takes a shard of the windows and the
    statistics are summed across processes before returning.
    """
    blocks = ffns(model)
    ids = torch.cat([d.windows for d in domains])
    sample_domain = torch.cat([torch.full((len(d.windows),), k) for k, d in enumerate(domains)])
    down_norms = torch.stack([b.down_norms() for b in blocks]) if thresholds is not None else None
    stats = NeuronStats(len(blocks), blocks[0].d_ff, [d.name for d in domains], sample_domain, thresholds,
                        down_norms, coactivation, coactivation_stride)
    with ffn_hooks(model, lambda i, a: stats.update(i, a)):
        for rows in progress(batches(len(ids), batch_size), desc):
            stats.set_batch(rows, ids.shape[1])
            run_model(model, ids[rows])
    return stats.reduce()

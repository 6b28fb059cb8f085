"""What every routed FFN shares: swapping into and out of a model, and counting the compute it runs.

A routed FFN (`BrickedFFN`: emergent bricks chosen by a router; `SparseFFN`:
single neurons and input channels chosen by magnitude) replaces one layer's FFN
module and runs a share of its multiply-accumulates per token. The *compute
fraction* is that share as configured (router included); the *executed
fraction* is what the forward passes since the last reset actually ran.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch
from torch import nn

from ..arch import FFN, decoder_layers, ffns, layout_for
from ..errors import BricksError
from .paths import CHOOSER, SERIAL, token_bucket, with_serial


class RoutedFFN(nn.Module):
    """Base class of FFN modules that run a share of the dense FFN's compute per token.

    An inference call runs on one of the module's `paths`, which all compute the same function; `path` fixes
    one (tests, benchmarks), None takes the fastest by timing (`bricks.routing.paths`).

    `dense_fallback` adds one more path, `dense`: the whole FFN, the dense model's function, taken where it is
    the fastest (a prefill, a batch) and counted as the whole FFN. That is how TEAL and CATS serve (sparse
    decoding, dense prefill), and it is off by default: with it, what a batch computes is not the routed
    function any more, so quality measured on batches would be the dense model's. On the CPU `dense` multiplies
    a copy of the weights in the dense model's own layout, made at its first call and kept while the fallback is
    on: the FFN's weights take twice their memory meanwhile.
    """

    # Subclasses set `projections` (the dense FFN's projection names by role) and `beside` (customized bricks
    # beside those projections, CPET's: `bricks.routing.beside`) in `__init__`: a class attribute would hide a
    # module assigned later (torch keeps submodules outside the instance dict).
    projections: dict[str, str] = {}
    paths: tuple[str, ...] = ()  # timed on CPU (all compute the routed function)
    device_paths: tuple[str, ...] = ()  # accelerator-only paths, which `set_path` may also fix
    path: str | None = None
    dense_fallback: bool = False

    def static_path(self, tokens: int) -> str:
        """The path off the CPU, where calls are not timed."""
        raise NotImplementedError

    @staticmethod
    def dense_on_copy(x: torch.Tensor) -> bool:
        """Whether `dense` runs on the copy of the weights in the dense model's layout, for inputs `x`: on the CPU,
        where torch's bf16 products were slower on the routed storage (bench/README.md, "On an AMD Zen 4 CPU");
        elsewhere no layout was measured to cost, and memory is scarcer, so it runs on the routed storage."""
        return x.device.type == "cpu"

    def untimed_path(self, tokens: int) -> str:
        """The path off the CPU, where calls are not timed (a timing needs the host to wait, which a CUDA graph cannot
        capture): `static_path`, or `dense` for several tokens under `dense_fallback`. The routed batch paths there
        (`masked`, `grouped`) were slower than dense at 32 tokens on an H200 (bench/README.md), and `masked` is
        dense matmuls plus its masks; the decode token keeps its sparse path (as TEAL and CATS serve)."""
        return "dense" if self.dense_fallback and tokens > 1 else self.static_path(tokens)

    def shape_key(self) -> tuple:
        """What makes two modules' calls cost the same: shapes and settings."""
        raise NotImplementedError

    def choose_path(self, x) -> tuple[str, tuple | None]:
        """(path, timing key) for a call on `x` `[tokens, hidden]`; the key is None when the call is not timed."""
        tokens = x.shape[0]
        if self.path is not None:
            return self.path, None
        if x.device.type != "cpu":
            return self.untimed_path(tokens), None
        key = self.timing_key(x)
        paths = self.paths_for(tokens) + (("dense",) if self.dense_fallback else ())
        return CHOOSER.choose(key, with_serial(paths, torch.get_num_threads())), key

    def timing_key(self, x) -> tuple:
        """Calls with the same key cost the same: they share timings (see `bricks.routing.paths`)."""
        return type(self).__name__, *self.shape_key(), x.dtype, token_bucket(x.shape[0])

    def paths_for(self, tokens: int) -> tuple[str, ...]:
        return self.paths

    def dense_macs_per_token(self) -> int:
        """Multiply-accumulates per token of the dense FFN this module replaces."""
        raise NotImplementedError

    def compute_fraction(self) -> float:
        """FFN multiply-accumulates per token over dense, as configured."""
        raise NotImplementedError

    def routed_fraction(self) -> float | None:
        """Compute fraction of the routed function over the tokens run since the counts were last reset (None when
        none ran): the share each token selected, whichever path ran it. Differs from `compute_fraction` only for
        routers whose choice varies per token (threshold)."""
        raise NotImplementedError

    def executed_fraction(self) -> float | None:
        """Compute fraction the paths ran over the tokens since the counts were last reset (None when none ran):
        the whole FFN for tokens run by dense matmuls on zeroed entries."""
        raise NotImplementedError

    def ranked_per_token(self) -> int:
        """Values ranked per token to choose what runs (a top-k: comparisons, no multiply-accumulates)."""
        return 0

    def selection_fraction(self) -> float:
        """The choice's own cost beside the compute fraction: values ranked per token over dense MACs."""
        return self.ranked_per_token() / self.dense_macs_per_token()

    def reset_counts(self) -> None:
        self.counts.zero_()

    def set_path(self, path: str | None) -> None:
        if path is not None and path.removesuffix(SERIAL) not in (*self.paths, *self.device_paths, "dense"):
            raise BricksError(f"unknown execution path {path!r} for {type(self).__name__}: one of "
                              f"{', '.join(self.paths + self.device_paths)} (the routed function) or dense, each with "
                              f"{SERIAL} to run on one thread")
        self.path = path

    def set_full(self) -> None:
        """Run the whole FFN: the dense model's function (the distillation teacher's setting)."""
        raise NotImplementedError

    def refresh(self) -> None:
        """Rebuild what is derived from the weights after they changed (recovery training)."""

    def write_dense(self, dense: FFN) -> None:
        """Write this FFN's weights back, in the original neuron order, into a dense FFN of the same shape."""
        raise NotImplementedError


def swap_ffns(model: nn.Module, make: Callable[[FFN], nn.Module], what: str = "routed") -> list[nn.Module]:
    """Replace every FFN module of `model` (in place) by `make(ffn)`; returns the original modules, in layer order."""
    layout = layout_for(model)
    if not layout.mlp:
        raise BricksError(f"{model.config.model_type} keeps its FFN inside the decoder block; {what} execution "
                          "needs a separate FFN module (supported: every family but opt)")
    layers = decoder_layers(model, layout)
    blocks = ffns(model)
    new = [make(f) for f in blocks]  # all built before any is swapped in: a failure leaves the model as it was
    originals = []
    for f, module in zip(blocks, new):
        originals.append(f.module)
        setattr(layers[f.layer], layout.mlp, module)
    return originals


def restore_ffns(model: nn.Module, originals: list[nn.Module]) -> None:
    """Put back the FFN modules `swap_ffns` returned."""
    layout = layout_for(model)
    for layer, module in zip(decoder_layers(model, layout), originals):
        setattr(layer, layout.mlp, module)


@contextlib.contextmanager
def swapped(model: nn.Module, originals: list[nn.Module]):
    """Inside the block the model runs as assembled; on exit (whatever happens) `originals` come back."""
    try:
        yield model
    finally:
        restore_ffns(model, originals)


def dense_blocks(model: nn.Module, skeletons: list[nn.Module] | None = None) -> list[FFN]:
    """The dense FFNs that `model`'s routed FFNs run, in layer order, on fresh modules: copies of `skeletons` (its
    dense FFN modules, e.g. on the meta device), else modules of its own architecture built from its config."""
    layout = layout_for(model)
    if skeletons is None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):  # structure only: no memory
            skeletons = [f.module for f in ffns(AutoModelForCausalLM.from_config(model.config))]
    blocks = []
    for i, (skeleton, routed) in enumerate(zip(skeletons, routed_layers(model))):
        blocks.append(FFN(None, i, layout, module=copy.deepcopy(skeleton).to_empty(device=next(routed.parameters()).device)))
        routed.write_dense(blocks[-1])
    return blocks


def dense_state_dict(model: nn.Module, blocks: list[FFN]) -> dict[str, torch.Tensor]:
    """`model`'s state dict as the dense model it runs: its routed FFNs' tensors replaced by those of `blocks`
    (`dense_blocks`), under the dense FFN's names, so that plain transformers opens the checkpoint."""
    layout = layout_for(model)
    weights = {k: v for k, v in model.state_dict().items() if f".{layout.mlp}." not in k}
    for b in blocks:
        weights.update({f"{layout.layers}.{b.layer}.{layout.mlp}.{k}": v for k, v in b.module.state_dict().items()})
    return weights


def routed_layers(model: nn.Module) -> list[RoutedFFN]:
    """The FFNs of `model` that run a share of their compute, in layer order."""
    return [m for m in model.modules() if isinstance(m, RoutedFFN)]


def set_path(model: nn.Module, path: str | None) -> None:
    """Run every routed FFN of `model` on one execution path (None: the fastest by timing, the default).

    The paths compute the same function, in a different order of floating-point additions: fix one to compare
    two models' outputs bit for bit, or to time one path.
    """
    for m in routed_layers(model):
        m.set_path(path)


def set_dense_fallback(model: nn.Module, on: bool = True) -> None:
    """Let every routed FFN of `model` run densely where that is faster (see `RoutedFFN`): for serving, not for
    measuring a routed model's quality. On the CPU the dense calls run a copy of the FFN weights (twice their memory)."""
    for m in routed_layers(model):
        m.dense_fallback = on


def compute_fraction(model: nn.Module) -> float:
    """Mean FFN compute fraction over the layers of `model`, as configured (1.0 for a dense model).

    No forward pass is needed to know it; routers that run a variable number
    of bricks per token (threshold) report their calibrated mean.
    """
    fr = [m.compute_fraction() for m in routed_layers(model)]
    return sum(fr) / len(fr) if fr else 1.0


def selection_fraction(model: nn.Module) -> float:
    """Mean over layers of the values ranked per token to choose what runs, over dense MACs (0.0 for a dense model).

    Not part of the compute fraction (a top-k makes comparisons, not multiply-accumulates); reported beside it.
    """
    fr = [m.selection_fraction() for m in routed_layers(model)]
    return sum(fr) / len(fr) if fr else 0.0


def _counted(model: nn.Module, fraction: str, reset: bool) -> float:
    layers = routed_layers(model)
    fr = [getattr(m, fraction)() for m in layers]
    if reset:
        for m in layers:
            m.reset_counts()
    fr = [f if f is not None else m.compute_fraction() for f, m in zip(fr, layers)]
    return sum(fr) / len(fr) if fr else 1.0


def routed_fraction(model: nn.Module, reset: bool = False) -> float:
    """Mean FFN compute fraction of the routed function over the tokens the forward passes ran (1.0 for a dense
    model): what each token selected, the figure to plot quality against. `reset` zeroes the counts afterwards."""
    return _counted(model, "routed_fraction", reset)


def executed_fraction(model: nn.Module, reset: bool = False) -> float:
    """Mean FFN compute fraction the forward passes actually ran (1.0 for a dense model): above the routed
    fraction where batches ran as dense matmuls on zeroed entries. `reset` zeroes the counts afterwards."""
    return _counted(model, "executed_fraction", reset)

"""Architecture table: where each model family keeps its FFN, as data.

An FFN neuron `i` is row `i` of the input projections (gate/up, or fc1) and
column `i` of the output projection (down, or fc2). Every analysis and every
brick in this package works on that neuron axis, and finds it through this
table. Adding a family is adding a row to `ARCHITECTURES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import BricksError


@dataclass(frozen=True)
class FFNLayout:
    """Where one model family keeps the parts of its feed-forward block."""

    layers: str  # dotted path from the CausalLM to the list of decoder blocks
    mlp: str  # attribute of a block holding the FFN ("" = the block itself, as in OPT)
    up: str | None  # input projection multiplied into the activation (up_proj, fc1, c_fc)
    down: str  # output projection; its input is the neuron activation vector
    act: str  # attribute (on the FFN module) holding the activation function
    gate: str | None = None  # gated FFNs (SwiGLU/GeGLU): act(gate(x)) * up(x)
    fused_gate_up: str | None = None  # phi3: one Linear whose rows are [gate; up]
    conv1d: bool = False  # GPT-2's Conv1D stores weights as [in, out]

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused_gate_up is not None


_LLAMA_LIKE = FFNLayout(layers="model.layers", mlp="mlp", gate="gate_proj", up="up_proj", down="down_proj", act="act_fn")

ARCHITECTURES: dict[str, FFNLayout] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "phi3": FFNLayout(layers="model.layers", mlp="mlp", up=None, fused_gate_up="gate_up_proj", down="down_proj", act="activation_fn"),
    "phi": FFNLayout(layers="model.layers", mlp="mlp", up="fc1", down="fc2", act="activation_fn"),
    "gpt2": FFNLayout(layers="transformer.h", mlp="mlp", up="c_fc", down="c_proj", act="act", conv1d=True),
    "gpt_neox": FFNLayout(layers="gpt_neox.layers", mlp="mlp", up="dense_h_to_4h", down="dense_4h_to_h", act="act"),
    "opt": FFNLayout(layers="model.decoder.layers", mlp="", up="fc1", down="fc2", act="activation_fn"),
}


def supported_model_types() -> list[str]:
    return sorted(ARCHITECTURES)


def layout_for(model_or_config) -> FFNLayout:
    """The FFN layout of a model (or config); unsupported families are refused."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise BricksError(
            f"unsupported architecture {model_type!r}: bricks knows the FFN layout of "
            f"{', '.join(supported_model_types())}; add a row to bricks.arch.ARCHITECTURES for others"
        )
    return ARCHITECTURES[model_type]


def _get(obj: nn.Module, dotted: str) -> nn.Module:
    for part in filter(None, dotted.split(".")):
        obj = getattr(obj, part)
    return obj


class FFN:
    """Handle on one layer's FFN: its modules and its weights on the neuron axis."""

    def __init__(self, model: nn.Module | None, layer: int, layout: FFNLayout | None = None, module: nn.Module | None = None):
        """Handle on `model`'s FFN of `layer`, or (with `module` and `layout`) on a detached FFN module."""
        self.layout = layout or layout_for(model)
        self.layer = layer
        self.module = module if module is not None else _get(decoder_layers(model, self.layout)[layer], self.layout.mlp)
        lay = self.layout
        self.down = getattr(self.module, lay.down)
        self.up = getattr(self.module, lay.up) if lay.up else None
        self.gate = getattr(self.module, lay.gate) if lay.gate else None
        self.gate_up = getattr(self.module, lay.fused_gate_up) if lay.fused_gate_up else None
        self.act = getattr(self.module, lay.act)

    @property
    def d_ff(self) -> int:
        return self.down_weight().shape[1]

    def _rows(self, linear: nn.Module) -> torch.Tensor:
        """Weight as [out, in] whatever the storage (Conv1D is [in, out])."""
        return linear.weight.t() if self.layout.conv1d else linear.weight

    def down_weight(self) -> torch.Tensor:
        """[hidden, d_ff]: column i is neuron i's output direction."""
        return self._rows(self.down)

    def down_bias(self) -> torch.Tensor | None:
        return self.down.bias

    @torch.no_grad()
    def down_norms(self) -> torch.Tensor:
        """[d_ff] fp32 on CPU: each neuron's output norm per unit activation, ||W_down[:, i]||. Also for a layer
        accelerate offloaded (its weights are loaded for the moment it takes)."""
        from accelerate.utils import align_module_device

        with align_module_device(self.down):
            return self.down_weight().detach().float().norm(dim=0).cpu()

    def up_weight(self) -> torch.Tensor:
        """[d_ff, hidden]: row i is neuron i's (up / fc1) input direction."""
        if self.gate_up is not None:
            return self.gate_up.weight[self.gate_up.weight.shape[0] // 2 :]
        return self._rows(self.up)

    def up_bias(self) -> torch.Tensor | None:
        if self.gate_up is not None:
            b = self.gate_up.bias
            return None if b is None else b[b.shape[0] // 2 :]
        return self.up.bias

    def gate_weight(self) -> torch.Tensor | None:
        """[d_ff, hidden] for gated FFNs, else None."""
        if self.gate_up is not None:
            return self.gate_up.weight[: self.gate_up.weight.shape[0] // 2]
        return None if self.gate is None else self._rows(self.gate)

    def gate_bias(self) -> torch.Tensor | None:
        if self.gate_up is not None:
            b = self.gate_up.bias
            return None if b is None else b[: b.shape[0] // 2]
        return None if self.gate is None else self.gate.bias

    def neuron_parts(self) -> dict[str, torch.Tensor]:
        """Every weight on the neuron axis, as `[d_ff, ...]` views (writes go through to the model)."""
        parts = {"up": self.up_weight(), "down": self.down_weight().t()}
        for name, t in (("gate", self.gate_weight()), ("gate_bias", self.gate_bias()), ("up_bias", self.up_bias())):
            if t is not None:
                parts[name] = t
        return parts

    def neuron_features(self) -> torch.Tensor:
        """[d_ff, k*hidden]: each neuron's input weights (gate and up rows), for clustering."""
        parts = [self.up_weight()]
        if self.gate_weight() is not None:
            parts.insert(0, self.gate_weight())
        return torch.cat([p.detach().float().cpu() for p in parts], dim=1)


def decoder_layers(model: nn.Module, layout: FFNLayout | None = None) -> nn.ModuleList:
    layout = layout or layout_for(model)
    return _get(model, layout.layers)


def ffns(model: nn.Module) -> list[FFN]:
    """One `FFN` handle per decoder layer, in order."""
    layout = layout_for(model)
    return [FFN(model, i, layout) for i in range(len(decoder_layers(model, layout)))]

"""Recovery bricks (CPET, Zhao et al. 2023): non-linear low-rank modules that restore what compression lost.

Beside a projection W (often compressed: pruned or quantized), a recovery
module adds `R(x) = (alpha / r) · U · σ(D x)` with D `[r, in]`, U `[out, r]`
and σ a non-linearity (GELU, as in the published code). U starts at zero, so
a new recovery brick changes nothing until it is trained. Unlike a LoRA delta,
R is not linear in x: it cannot be folded into the weights, and PEFT's LoRA
format cannot carry it, so a recovery brick is saved in the bricks format only
(`to_peft` refuses it by name).

On disk: `bricks.json` (format `bricks.adapter`, kind "recovery", per module
rank, alpha, activation) + `bricks.safetensors` (`<module>.recovery_D`,
`<module>.recovery_U`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import BricksError
from .lora import FORMAT, VERSION, read_brick_tensors, write_brick_dir

ACTIVATIONS = {"gelu": nn.functional.gelu, "relu": nn.functional.relu, "silu": nn.functional.silu}


class RecoveryModule(nn.Module):
    """R(x) = (alpha / r) · U σ(D x), U zero at initialisation."""

    def __init__(self, in_features: int, out_features: int, rank: int = 32, alpha: float | None = None,
                 activation: str = "gelu", generator: torch.Generator | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise BricksError(f"unknown recovery activation {activation!r}: choose from {', '.join(ACTIVATIONS)}")
        if rank < 1:
            raise BricksError(f"recovery rank must be >= 1, got {rank}")
        self.D = nn.Parameter(torch.empty(rank, in_features))
        self.U = nn.Parameter(torch.zeros(out_features, rank))
        bound = 1 / math.sqrt(in_features)  # Kaiming-uniform with a=sqrt(5), as nn.Linear and LoRA's A
        with torch.no_grad():
            self.D.uniform_(-bound, bound, generator=generator)
        self.alpha = float(alpha if alpha is not None else rank)
        self.activation = activation

    @property
    def rank(self) -> int:
        return self.D.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = ACTIVATIONS[self.activation](nn.functional.linear(x.to(self.D.dtype), self.D))
        return nn.functional.linear(h, self.U) * self.scaling


@dataclass
class RecoveryBrick:
    """Recovery modules by target module name (`model.layers.0.self_attn.q_proj`, ...)."""

    modules: dict[str, RecoveryModule]
    name: str = "recovery"
    base_model: str | None = None

    def info(self) -> dict:
        ranks = sorted({m.rank for m in self.modules.values()})
        return {"name": self.name, "kind": "recovery", "base_model": self.base_model, "modules": len(self.modules),
                "target_modules": sorted({n.rsplit(".", 1)[-1] for n in self.modules}), "ranks": ranks,
                "activation": sorted({m.activation for m in self.modules.values()}),
                "parameters": sum(p.numel() for m in self.modules.values() for p in m.parameters())}

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        meta = {"format": FORMAT, "version": VERSION, "kind": "recovery", "name": self.name, "base_model": self.base_model,
                "modules": {n: {"rank": m.rank, "alpha": m.alpha, "activation": m.activation,
                                "in": m.D.shape[1], "out": m.U.shape[0]} for n, m in self.modules.items()}}
        state = {}
        for n, m in self.modules.items():
            state[f"{n}.recovery_D"] = m.D.detach().float().cpu().contiguous()
            state[f"{n}.recovery_U"] = m.U.detach().float().cpu().contiguous()
        return write_brick_dir(out, meta, state, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "RecoveryBrick":
        path = Path(path)
        meta = read_meta(path)
        if meta.get("kind") != "recovery":
            raise BricksError(f"{path} is a {meta.get('kind')!r} brick, not a recovery brick")
        state = read_brick_tensors(path)
        modules = {}
        for n, m in meta["modules"].items():
            D, U = state.get(f"{n}.recovery_D"), state.get(f"{n}.recovery_U")
            if D is None or U is None:
                raise BricksError(f"{path} lacks the factors of {n}: the brick is corrupt")
            if D.shape != (m["rank"], m["in"]) or U.shape != (m["out"], m["rank"]):
                raise BricksError(f"{path}: {n} has D {tuple(D.shape)} and U {tuple(U.shape)}, bricks.json says rank "
                                  f"{m['rank']}, {m['in']} in, {m['out']} out: the brick is corrupt")
            if not (torch.isfinite(D).all() and torch.isfinite(U).all()):
                raise BricksError(f"{path}: {n} holds NaN or infinite values")
            mod = RecoveryModule(m["in"], m["out"], m["rank"], m["alpha"], m["activation"])
            with torch.no_grad():
                mod.D.copy_(D)
                mod.U.copy_(U)
            modules[n] = mod
        return cls(modules, meta.get("name", path.name), meta.get("base_model"))

    def to_peft(self, *_args, **_kwargs):
        raise BricksError(f"{self.name!r} is a recovery brick (R(x) = U·GELU(D·x), non-linear): PEFT's LoRA format "
                          "cannot carry it; keep it in the bricks format (bricks.load_model opens CPET directories)")


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / "bricks.json").read_text())
    except FileNotFoundError:
        raise BricksError(f"{path} is not a brick directory (no bricks.json)") from None
    except json.JSONDecodeError as exc:
        raise BricksError(f"{path / 'bricks.json'} is not valid JSON: the brick is corrupt") from exc


def load_customized(path: str | Path):
    """A LoRA brick (or PEFT directory) or a recovery brick, whichever `path` holds."""
    from .lora import AdapterBrick

    path = Path(path)
    if (path / "bricks.json").is_file() and read_meta(path).get("kind") == "recovery":
        return RecoveryBrick.load(path)
    return AdapterBrick.load(path)

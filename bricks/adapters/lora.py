"""Customized bricks: PEFT LoRA adapters as bricks of low-rank deltas.

A LoRA brick holds, per target module, the factors A `[r, in]` and B `[out, r]`
and the scaling, so that the module's weight becomes `W + ΔW` with
`ΔW = scaling · B @ A` (`scaling = alpha / r`, or `alpha / sqrt(r)` for rsLoRA;
`r` and `alpha` per module from `rank_pattern` / `alpha_pattern`). For Conv1D
modules (GPT-2, `fan_in_fan_out`) the base weight is stored `[in, out]`, and so
is the delta.

Import reads a PEFT adapter directory (`adapter_config.json` +
`adapter_model.safetensors`), export writes one PEFT loads unchanged. Features
this brick cannot represent (DoRA, trained biases, modules_to_save, LoRA on
embeddings, ...) are refused by name, never dropped.

On disk a brick is a directory: `bricks.json` (format, the PEFT config, per
module rank/alpha/scaling) + `bricks.safetensors` (`<module>.lora_A`, `<module>.lora_B`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import BricksError
from ..io import atomic_dir

FORMAT = "bricks.adapter"
VERSION = 1
PEFT_PREFIX = "base_model.model."

# LoraConfig fields this brick cannot represent, with the value that means "not in use".
_UNSUPPORTED = {
    "use_dora": False,
    "lora_bias": False,
    "modules_to_save": None,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "use_qalora": False,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "use_bdlora": False,
    "kasa_config": None,
}
SUPPORTED_SWITCHES = {"use_rslora"}  # any other truthy `use_*` field is a LoRA variant a brick cannot carry


@dataclass
class LoRAModule:
    """One target module's factors: ΔW = scaling · B @ A (transposed when `fan_in_fan_out`)."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    alpha: float
    rslora: bool = False
    fan_in_fan_out: bool = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def delta(self, dtype: torch.dtype = torch.float32, rows: slice | None = None) -> torch.Tensor:
        """ΔW in the base weight's own layout (`[out, in]`, or `[in, out]` for Conv1D); `rows`: only those rows
        of that layout (a merge streams large tensors in row chunks)."""
        B, A = self.B.to(dtype), self.A.to(dtype)
        if rows is None:
            d = (B @ A) * self.scaling
        elif self.fan_in_fan_out:
            d = (B @ A[:, rows]) * self.scaling  # the layout's rows are the input features, A's columns
        else:
            d = (B[rows] @ A) * self.scaling
        return d.t() if self.fan_in_fan_out else d


@dataclass
class AdapterBrick:
    """A LoRA adapter as a customized brick: target module name -> `LoRAModule`."""

    modules: dict[str, LoRAModule]
    config: dict = field(default_factory=dict)  # the PEFT adapter config, kept for export
    name: str = "adapter"

    # ------------------------------------------------------------------ PEFT
    @classmethod
    def from_peft(cls, path: str | Path, name: str | None = None) -> "AdapterBrick":
        """Read a PEFT LoRA adapter directory."""
        path = Path(path)
        cfg_file = path / "adapter_config.json"
        if not cfg_file.is_file():
            raise BricksError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
        try:
            config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise BricksError(f"{cfg_file} is not valid JSON: the adapter is corrupt") from exc
        _check_config(config, cfg_file)
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            if (path / "adapter_model.bin").is_file():
                raise BricksError(f"{path} holds adapter_model.bin (pickle): convert it to safetensors first, "
                                  "e.g. PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True)")
            raise BricksError(f"{path} has no adapter_model.safetensors")
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as exc:
            raise BricksError(f"cannot read {weights}: {exc} (truncated or corrupt file)") from exc
        return cls(_modules_from_state(state, config, weights), config, name or path.name)

    def to_peft(self, out: str | Path, overwrite: bool = False) -> Path:
        """Write a PEFT adapter directory (`PeftModel.from_pretrained` opens it)."""
        config = dict(self.config)
        ranks = {m.rank for m in self.modules.values()}
        alphas = {m.alpha for m in self.modules.values()}
        # Express per-module ranks and alphas the way PEFT reads them: defaults plus full-name patterns.
        r = config.get("r") if config.get("r") in ranks else max(ranks, key=lambda x: sum(m.rank == x for m in self.modules.values()))
        alpha = config.get("lora_alpha") if config.get("lora_alpha") in alphas else next(iter(alphas))
        config.update({
            "peft_type": "LORA", "r": r, "lora_alpha": alpha,
            "rank_pattern": {_pattern(n): m.rank for n, m in self.modules.items() if m.rank != r},
            "alpha_pattern": {_pattern(n): m.alpha for n, m in self.modules.items() if m.alpha != alpha},
            "use_rslora": any(m.rslora for m in self.modules.values()),
            "fan_in_fan_out": any(m.fan_in_fan_out for m in self.modules.values()),
        })
        if not config.get("target_modules"):
            config["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n in self.modules})
        state = {}
        for n, m in self.modules.items():
            state[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.A.contiguous()
            state[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.B.contiguous()
        with atomic_dir(out, overwrite=overwrite) as tmp:
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        return Path(out)

    # ------------------------------------------------------------------ brick format
    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        meta = {"format": FORMAT, "version": VERSION, "kind": "lora", "name": self.name, "peft_config": self.config,
                "modules": {n: {"rank": m.rank, "alpha": m.alpha, "rslora": m.rslora, "fan_in_fan_out": m.fan_in_fan_out,
                                "scaling": m.scaling} for n, m in self.modules.items()}}
        state = {}
        for n, m in self.modules.items():
            state[f"{n}.lora_A"] = m.A.contiguous()
            state[f"{n}.lora_B"] = m.B.contiguous()
        return write_brick_dir(out, meta, state, overwrite)

    @classmethod
    def load(cls, path: str | Path) -> "AdapterBrick":
        path = Path(path)
        if (path / "adapter_config.json").is_file():
            return cls.from_peft(path)  # a PEFT directory works wherever a brick does
        try:
            meta = json.loads((path / "bricks.json").read_text())
        except FileNotFoundError:
            raise BricksError(f"{path} is neither an adapter brick (bricks.json) nor a PEFT adapter (adapter_config.json)")
        except json.JSONDecodeError as exc:
            raise BricksError(f"{path / 'bricks.json'} is not valid JSON: the brick is corrupt") from exc
        if meta.get("format") != FORMAT:
            raise BricksError(f"{path} is not an adapter brick (format {meta.get('format')!r}); emergent bricks load with "
                              "bricks.BrickSet.load")
        if meta.get("kind") == "recovery":
            raise BricksError(f"{path} is a recovery brick (non-linear, from CPET), not a LoRA adapter: it cannot be "
                              "merged into weights or exported to PEFT; bricks.load_model opens the CPET directory holding it")
        state = read_brick_tensors(path)
        modules = {}
        for n, m in meta["modules"].items():
            if f"{n}.lora_A" not in state or f"{n}.lora_B" not in state:
                raise BricksError(f"{path} lacks the factors of {n}: the brick is corrupt")
            modules[n] = LoRAModule(state[f"{n}.lora_A"], state[f"{n}.lora_B"], m["alpha"], m["rslora"], m["fan_in_fan_out"])
            _check_factors(n, modules[n], path)
        return cls(modules, meta.get("peft_config", {}), meta.get("name", path.name))

    # ------------------------------------------------------------------ views
    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def info(self) -> dict:
        ranks = sorted({m.rank for m in self.modules.values()})
        return {"name": self.name, "kind": "lora", "base_model": self.base_model, "modules": len(self.modules),
                "target_modules": sorted({n.rsplit(".", 1)[-1] for n in self.modules}), "ranks": ranks,
                "rslora": any(m.rslora for m in self.modules.values()),
                "parameters": sum(m.A.numel() + m.B.numel() for m in self.modules.values())}

    def deltas(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """`{"<module>.weight": ΔW}` in each base weight's layout."""
        return {f"{n}.weight": m.delta(dtype) for n, m in self.modules.items()}

    def check_model(self, model: torch.nn.Module) -> None:
        """Every target module exists in `model` with the shapes of its factors, else a one-line error."""
        named = dict(model.named_modules())
        for n, m in self.modules.items():
            if n not in named:
                raise BricksError(f"adapter {self.name!r} targets {n}, which this model does not have: "
                                  "the adapter was trained for another base")
            w = getattr(named[n], "weight", None)
            shape = tuple(w.shape) if w is not None else None
            want = tuple(m.delta().shape) if m.fan_in_fan_out else (m.B.shape[0], m.A.shape[1])
            if shape != want:
                raise BricksError(f"adapter {self.name!r}: {n} is {shape} in this model, the adapter's delta is {want}: "
                                  "the adapter was trained for another base")

    @torch.no_grad()
    def merge_into(self, model: torch.nn.Module, weight: float = 1.0) -> None:
        """Add `weight · ΔW` to the model's weights in place (`weight=-1` detaches a merged brick)."""
        self.check_model(model)
        named = dict(model.named_modules())
        for n, m in self.modules.items():
            w = named[n].weight
            w.add_((m.delta(torch.float32) * weight).to(w.device, w.dtype))


def write_brick_dir(out: str | Path, meta: dict, state: dict, overwrite: bool = False) -> Path:
    """A customized brick's directory, atomically: `bricks.json` (its record) and `bricks.safetensors`."""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "bricks.json").write_text(json.dumps(meta, indent=1))
        save_file(state, str(tmp / "bricks.safetensors"))
    return Path(out)


def read_brick_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path / "bricks.safetensors"))
    except (SafetensorError, OSError) as exc:
        raise BricksError(f"cannot read {path / 'bricks.safetensors'}: {exc} (truncated or corrupt file)") from exc


def _pattern(module: str) -> str:
    """A rank/alpha pattern for exactly this module: PEFT matches `(.*\\.)?<pattern>$`, so the full name suffices."""
    return module


def _check_config(config: dict, where: Path) -> None:
    kind = config.get("peft_type")
    if kind != "LORA":
        raise BricksError(f"{where}: PEFT type {kind!r} is not supported as a brick (LoRA only)")
    switches = {k: False for k in config if k.startswith("use_") and k not in SUPPORTED_SWITCHES}
    for key, off in {**switches, **_UNSUPPORTED}.items():
        value = config.get(key, off)
        if value not in (off, None, False, [], {}):
            raise BricksError(f"{where}: {key}={value!r} is not supported by adapter bricks "
                              f"(plain LoRA factors only); it would be lost, so the adapter is refused")
    if config.get("bias", "none") != "none":
        raise BricksError(f"{where}: bias={config['bias']!r} trains biases, which adapter bricks do not hold "
                          "(use bias='none')")


def _match(patterns: dict, module: str):
    """PEFT's rule: a pattern applies to a module whose name ends with it (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _modules_from_state(state: dict[str, torch.Tensor], config: dict, where: Path) -> dict[str, LoRAModule]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", key)
        if m is None:
            what = "LoRA on embeddings" if "lora_embedding" in key else "a tensor that is not a LoRA factor"
            raise BricksError(f"{where}: {key} is {what}, which adapter bricks do not support")
        factors.setdefault(m.group(1), {})[m.group(2)] = t
    if not factors:
        raise BricksError(f"{where} holds no LoRA factors")
    modules = {}
    for name, f in sorted(factors.items()):
        if set(f) != {"lora_A", "lora_B"}:
            raise BricksError(f"{where}: {name} has only {sorted(f)}: the adapter is incomplete")
        alpha = _match(config.get("alpha_pattern") or {}, name)
        rank = _match(config.get("rank_pattern") or {}, name) or config.get("r")
        mod = LoRAModule(f["lora_A"], f["lora_B"], float(alpha if alpha is not None else config.get("lora_alpha", 8)),
                         bool(config.get("use_rslora", False)), bool(config.get("fan_in_fan_out", False)))
        if rank is not None and mod.rank != rank:
            raise BricksError(f"{where}: {name} has rank {mod.rank} in its weights but {rank} in adapter_config.json")
        _check_factors(name, mod, where)
        modules[name] = mod
    return modules


def _check_factors(name: str, m: LoRAModule, where) -> None:
    if m.A.dim() != 2 or m.B.dim() != 2 or m.A.shape[0] != m.B.shape[1]:
        raise BricksError(f"{where}: {name} has factors A {tuple(m.A.shape)} and B {tuple(m.B.shape)}, "
                          "whose ranks do not match")
    for label, t in (("A", m.A), ("B", m.B)):
        if not torch.isfinite(t).all():
            raise BricksError(f"{where}: {name}.lora_{label} holds NaN or infinite values")

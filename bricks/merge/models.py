"""Out-of-core model merging from a mergekit-style YAML config.

    merge_method: ties
    base_model: path/to/base
    models:
      - model: path/to/tuned-a
        parameters: {weight: 0.5, density: 0.5}
      - model: path/to/base+path/to/lora   # an adapter applied to its base first
        parameters: {weight: 0.5, density: 0.5}
    parameters: {normalize: true}
    dtype: float32

Parameter values are scalars, gradients (a list interpolated over the layer
index, as mergekit does) or lists of `{filter, value}` (the first whose filter
is a substring of the tensor name applies). The config is validated before any
tensor is read. Tensors are streamed one at a time from the inputs' safetensors
shards and written into sharded safetensors output. A merge holds at most one
whole input tensor (plus the base's and the output's) and row chunks of the
others, so its memory does not grow with the number of inputs.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path
from typing import Any, Union

import torch
import yaml
from pydantic import BaseModel, ConfigDict, field_validator

from ..adapters.lora import AdapterBrick
from ..errors import BricksError
from ..io import atomic_dir, check_output, read_yaml, validated
from ..loading import split_spec
from .methods import METHODS, check_params, is_task_method, merge, needs_base
from .safetensors_io import Checkpoint, ShardedWriter, copy_side_files

Scalar = Union[bool, int, float, str]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: Union[Scalar, list[Scalar]]
    filter: str | None = None


Setting = Union[Scalar, list[Scalar], Conditional, list[Conditional]]


class InputModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Setting] = {}


class MergeConfig(BaseModel):
    """A merge, as written in YAML (mergekit's `models:` form)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[InputModel]
    parameters: dict[str, Setting] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    seed: int = 0  # for the random methods (DARE, DELLA): same seed, same merge

    @field_validator("merge_method")
    @classmethod
    def _known(cls, v):
        if v not in METHODS:
            raise ValueError(f"unknown merge method {v!r}: choose from {METHODS.names()}")
        return v

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype(cls, v):
        if v is not None and v not in ("float32", "float16", "bfloat16", "float64"):
            raise ValueError(f"dtype {v!r}: choose float32, float16, bfloat16 or float64")
        return v


_NOT_YET = {"slices": "slices (layer ranges, passthrough stacking)", "modules": "per-module slices",
            "tokenizer": "tokenizer surgery", "chat_template": "chat template selection"}


def load_config(path: str | Path) -> MergeConfig:
    """Parse and validate a merge YAML; every problem is a one-line `BricksError`."""
    raw = read_yaml(path, "merge", {k: f"({what}) is not supported yet; write the merge with 'models:'"
                                    for k, what in _NOT_YET.items()})
    cfg = validated(MergeConfig, raw, path)
    if not cfg.models:
        raise BricksError(f"{path}: 'models' is empty: list the models to merge")
    if needs_base(cfg.merge_method) and cfg.base_model is None:
        raise BricksError(f"{path}: merge method {cfg.merge_method!r} needs base_model")
    try:
        check_params(cfg.merge_method, {k: _values(v) for k, v in cfg.parameters.items()},
                     [{k: _values(v) for k, v in m.parameters.items()} for m in cfg.models])
    except BricksError as exc:
        raise BricksError(f"{path}: {exc}") from None
    missing = [m.model for m in cfg.models if "weight" not in m.parameters]
    if is_task_method(cfg.merge_method) and missing:  # as in mergekit, the task-vector methods require a weight
        raise BricksError(f"{path}: {cfg.merge_method} needs a weight for every model (missing for {', '.join(missing)})")
    return cfg


def _values(setting: Setting) -> list:
    """Every scalar a setting can take (each point of a gradient, each condition's value), for validation."""
    if isinstance(setting, list):
        return [v for x in setting for v in _values(x)]
    if isinstance(setting, Conditional):
        return _values(setting.value)
    return [setting]


_LAYER = re.compile(r"\.layers\.(\d+)\.|\.h\.(\d+)\.")


def resolve(setting: Setting, name: str, t: float):
    """Value of a parameter setting for tensor `name` at relative layer position t (mergekit's rules)."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(x, Conditional) for x in setting):
            for cond in setting:
                if cond.filter in (None, "*") or cond.filter in name:
                    return resolve(cond.value, name, t)
            return None
        values = list(setting)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        pos = t * (len(values) - 1)
        i = int(pos)
        j = min(len(values) - 1, i + 1)
        return (1 - (pos - i)) * values[i] + (pos - i) * values[j]
    return setting


def run_merge(config: MergeConfig, out: str | Path, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
              progress=None) -> dict:
    """Merge tensor by tensor into `out` (atomic); returns a summary."""
    method = config.merge_method
    inputs = []
    for m in config.models:
        path, adapter = split_spec(m.model)
        if not Path(path).is_dir():
            raise BricksError(f"model {path} is not a directory (merging reads local checkpoints, never downloads)")
        inputs.append((Checkpoint(path), AdapterBrick.load(adapter) if adapter else None, m.parameters))
    base_path = config.base_model
    base = Checkpoint(base_path) if base_path else None
    # The base may also be listed among the models (mergekit allows it): it contributes no task vector.
    if base is not None:
        inputs = [x for x, m in zip(inputs, config.models) if split_spec(m.model) != (base_path, None)]
    reference = base or inputs[0][0]
    names = reference.names()
    kind = _model_type(reference.path)
    for ckpt, adapter, _ in inputs:
        if _model_type(ckpt.path) != kind:
            raise BricksError(f"{ckpt.path} is a {_model_type(ckpt.path)} model, {reference.path} a {kind} model: "
                              "the models to merge differ in architecture")
        extra = [n for n in ckpt.entries if n not in reference.entries]
        if extra:
            raise BricksError(f"{ckpt.path} has {extra[0]} (and {len(extra) - 1} more) that {reference.path} lacks: "
                              "the models to merge differ in architecture")
        missing = [n for n in names if n not in ckpt.entries]
        if missing:
            raise BricksError(f"{ckpt.path} lacks {missing[0]} (and {len(missing) - 1} more): the models to merge "
                              "differ in architecture")
        for n in names:
            if ckpt.shape(n) != reference.shape(n):
                raise BricksError(f"{ckpt.path}: {n} is {ckpt.shape(n)}, {reference.path} has {reference.shape(n)}: "
                                  "shape mismatch, these models cannot be merged")
        if adapter is not None:
            for mod, lora in adapter.modules.items():
                if f"{mod}.weight" not in ckpt.entries:
                    raise BricksError(f"adapter {adapter.name!r} targets {mod}, which {ckpt.path} does not have: "
                                      "adapters for a different base")
                want = tuple(lora.delta().shape)
                if ckpt.shape(f"{mod}.weight") != want:
                    raise BricksError(f"adapter {adapter.name!r}: {mod} is {ckpt.shape(f'{mod}.weight')} in {ckpt.path}, "
                                      f"the adapter's delta {want}: rank or shape mismatch")
    n_layers = 1 + max([int(next(g for g in m.groups() if g)) for n in names for m in [_LAYER.search(n)] if m] or [0])
    compute_dtype = getattr(torch, config.dtype) if config.dtype else None
    out_dtype = getattr(torch, config.out_dtype) if config.out_dtype else compute_dtype

    def final_dtype(n):
        d = reference.dtype(n)
        return out_dtype if (out_dtype is not None and d.is_floating_point) else d

    plan = [(n, reference.shape(n), final_dtype(n)) for n in names]
    _return_freed_memory()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp, plan, max_shard_bytes)
        try:
            for i, n in enumerate(names):
                layer = _LAYER.search(n)
                t = int(next(g for g in layer.groups() if g)) / max(1, n_layers - 1) if layer else 0.0
                if not reference.dtype(n).is_floating_point:
                    writer.write(n, reference.get(n))
                    continue
                dtype = compute_dtype or reference.dtype(n)
                per_model = [{k: resolve(v, n, t) for k, v in params.items()} for _, _, params in inputs]
                tensors = [functools.partial(_read, ckpt, adapter, n, dtype) for ckpt, adapter, _ in inputs]
                shared = {k: resolve(v, n, t) for k, v in config.parameters.items()}
                seed = int.from_bytes(hashlib.sha256(f"{config.seed}:{n}".encode()).digest()[:8], "little") >> 1
                g = torch.Generator().manual_seed(seed)  # per tensor: independent of the order tensors are merged in
                base_of = functools.partial(_read, base, None, n, dtype) if base else None
                merged = merge(method, base_of, tensors, per_model, shared, g)
                if not torch.isfinite(merged).all():
                    bad = int((~torch.isfinite(merged)).sum())
                    raise BricksError(f"merging {n} gave {bad} NaN or infinite values of {merged.numel()}: check the "
                                      "weights (with normalize, weights that sum to 0 divide by zero)")
                writer.write(n, merged.to(final_dtype(n)))
                if progress:
                    progress(i + 1, len(names))
        finally:
            writer.close()
        copy_side_files(Path(config.tokenizer_source or base_path or split_spec(config.models[0].model)[0]),
                         Path(base_path or split_spec(config.models[0].model)[0]), tmp, out_dtype)
        (tmp / "bricks_merge.yaml").write_text(yaml.safe_dump(config.model_dump(exclude_defaults=False), sort_keys=False))
    return {"out": str(out), "method": method, "tensors": len(names), "shards": len(writer.files),
            "inputs": [str(c.path) + (f"+{a.name}" if a else "") for c, a, _ in inputs]}


def _return_freed_memory() -> None:
    """Have glibc serve every allocation over 1 MB from its own mapping, returned to the system when freed.

    By default glibc raises that threshold up to 32 MB once large blocks have been freed, so the merge's
    row chunks and keep-masks (16-28 MB) then come from the heap, whose freed holes stay resident: that
    alone added ~150 MB to the peak of a merge of the default model. Elsewhere than glibc this does nothing.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _read(ckpt: Checkpoint, adapter: AdapterBrick | None, name: str, dtype: torch.dtype,
          rows: slice | None = None) -> torch.Tensor:
    """One input tensor (or `rows` of it), with its adapter's delta applied; non-finite values are refused."""
    x = ckpt.get(name, rows).to(dtype)
    module = name.removesuffix(".weight")
    if adapter is not None and module in adapter.modules:
        x = x + adapter.modules[module].delta(torch.float32, rows).to(dtype)
    # A NaN or inf makes the sum non-finite; the sum is cheap (no mask tensor), and only when it is not finite
    # (which an overflow alone could also cause) is every entry checked.
    if x.is_floating_point() and not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
        raise BricksError(f"{ckpt.path}: {name} holds NaN or infinite values: refusing to merge it")
    return x


def _model_type(path: Path) -> str | None:
    import json

    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def merge_models(config_path: str | Path, out: str | Path, **kwargs: Any) -> dict:
    """`bricks merge CONFIG.yaml --out DIR`: validate, then merge out of core."""
    check_output(out, kwargs.get("overwrite", False))
    return run_merge(load_config(config_path), out, **kwargs)

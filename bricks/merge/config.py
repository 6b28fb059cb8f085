"""The merge YAML, as mergekit users write it: `models:` (whole models), `slices:` (layer ranges), or `modules:`
with the one module of a decoder-only model (`default`).

    merge_method: slerp                 # or: ties, linear, passthrough, ...
    base_model: path/to/a
    slices:
      - sources:
          - model: path/to/a
            layer_range: [0, 24]
          - model: path/to/b
            layer_range: [0, 24]
    parameters:
      t: [0, 0.5, 1]                    # a gradient over each slice's layers

Parameter values are scalars, gradients (a list interpolated over the
position of the layer within its slice, as mergekit does) or lists of
`{filter, value}` (the first whose filter is a substring of the tensor name
applies). A parameter is looked up on the slice source first, then on the
output slice, then on the model (`models:` form), then in the global
`parameters`. The whole config is validated before any tensor is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..errors import BricksError
from ..io import read_yaml, validated
from .methods import METHODS, check_params, is_task_method, needs_base
from .tokenizers import chat_template

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


class InputSlice(BaseModel):
    """Layers `[start, end)` of one model, in an output slice."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Setting] = {}

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v):
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layer_range [{v[0]}, {v[1]}] must be [start, end) with 0 <= start < end")
        return v


class OutputSlice(BaseModel):
    """Output layers made from the same number of layers of each source, merged layer by layer."""

    model_config = ConfigDict(extra="forbid")
    sources: list[InputSlice]
    parameters: dict[str, Setting] = {}


class ZeroEmbedding(BaseModel):
    """A token whose rows are zeros."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class ModelTokenEmbedding(BaseModel):
    """A token whose rows are another token's rows in one model (by its id or its text there)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_token(self):
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source names its token by token or token_id (exactly one)")
        if self.token_id is not None and self.token_id < 0:
            raise ValueError(f"token_id must be a row of the model, got {self.token_id}")
        return self


class TokenEmbedding(BaseModel):
    """Where one merged token's embedding rows come from (an entry of `tokenizer.tokens`).

    `source`: a merged model (its row of the same token), `{kind: zero}`, or `{kind: model_token, model, token |
    token_id}`. The rows stand in for the inputs that lack the token; with `force`, for every input, so the
    merged row is exactly that row.
    """

    model_config = ConfigDict(extra="forbid")
    source: Union[ZeroEmbedding, ModelTokenEmbedding, str]
    force: bool = False

    @field_validator("source", mode="before")
    @classmethod
    def _by_kind(cls, v):
        """A mapping is parsed by its `kind`, so that an error names what is wrong with it (not every union member)."""
        if not isinstance(v, dict):
            return v
        kinds = {"zero": ZeroEmbedding, "model_token": ModelTokenEmbedding}
        if v.get("kind") not in kinds:
            raise ValueError(f"source kind {v.get('kind')!r}: choose zero or model_token (or name a model)")
        try:
            return kinds[v["kind"]].model_validate(v)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None

    @property
    def model(self) -> str | None:
        return self.source if isinstance(self.source, str) else getattr(self.source, "model", None)


class TokenizerSettings(BaseModel):
    """mergekit's `tokenizer:` block: the merged vocabulary, the multiple its size is padded to, and per-token
    embedding sources."""

    model_config = ConfigDict(extra="forbid")
    source: str  # "union", "base" or a model
    pad_to_multiple_of: int | None = None
    tokens: dict[str, TokenEmbedding] = {}

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _pad(cls, v):
        if v is not None and v < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {v}")
        return v


class MergeConfig(BaseModel):
    """A merge, as written in YAML."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[InputModel] | None = None
    slices: list[OutputSlice] | None = None
    parameters: dict[str, Setting] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # a model, "base" or "union" (embeddings re-indexed when vocabularies differ)
    tokenizer: TokenizerSettings | None = None  # the same, with padding
    chat_template: str | None = None  # "auto", a built-in name, or a Jinja template
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

    def model_parameters(self, model: str) -> dict[str, Setting]:
        """The `models:` entry's parameters of `model` (none in the `slices:` form)."""
        return next((m.parameters for m in self.models or [] if m.model == model), {})

    @property
    def vocabulary_source(self) -> str | None:
        return self.tokenizer.source if self.tokenizer else self.tokenizer_source


def values(setting: Setting) -> list:
    """Every scalar a setting can take (each point of a gradient, each condition's value), for validation."""
    if isinstance(setting, list):
        return [v for x in setting for v in values(x)]
    if isinstance(setting, Conditional):
        return values(setting.value)
    return [setting]


def resolve(setting: Setting, name: str, t: float):
    """Value of a parameter setting for tensor `name` at relative position t in its slice (mergekit's rules)."""
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
        vals = list(setting)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            return vals[int(t * (len(vals) - 1))]
        pos = t * (len(vals) - 1)
        i = int(pos)
        j = min(len(vals) - 1, i + 1)
        return (1 - (pos - i)) * vals[i] + (pos - i) * vals[j]
    return setting


def _default_module(raw: dict, path) -> dict:
    """mergekit's `modules:` form, for the one module of a decoder-only model (mergekit calls it `default`): its
    `models` or `slices` become the config's, and its `parameters` override the global ones."""
    if "modules" not in raw:
        return raw
    modules = raw["modules"]
    if not isinstance(modules, dict) or not modules:
        raise BricksError(f"{path}: 'modules' maps module names to their models or slices")
    if set(modules) != {"default"}:
        raise BricksError(f"{path}: modules {', '.join(map(repr, modules))}: bricks merges decoder-only language "
                          "models, whose one module mergekit calls 'default' (multimodal modules are not supported)")
    if "models" in raw or "slices" in raw:
        raise BricksError(f"{path}: give the models to merge as 'models', 'slices' or 'modules' (exactly one)")
    module = modules["default"]
    if not isinstance(module, dict) or set(module) - {"models", "slices", "parameters"}:
        extra = sorted(set(module) - {"models", "slices", "parameters"}) if isinstance(module, dict) else module
        raise BricksError(f"{path}: modules.default holds models or slices and parameters, not {extra}")
    out = {k: v for k, v in raw.items() if k != "modules"}
    out.update({k: module[k] for k in ("models", "slices") if k in module})
    if module.get("parameters"):
        out["parameters"] = {**(raw.get("parameters") or {}), **module["parameters"]}
    return out


def load_config(path: str | Path) -> MergeConfig:
    """Parse and validate a merge YAML; every problem is a one-line `BricksError`."""
    raw = _default_module(read_yaml(path, "merge"), path)
    cfg = validated(MergeConfig, raw, path)
    for key in ("models", "slices"):
        if getattr(cfg, key) == []:
            raise BricksError(f"{path}: '{key}' is empty: list the models to merge")
    if bool(cfg.models) == bool(cfg.slices):
        raise BricksError(f"{path}: give the models to merge either as 'models' or as 'slices' (exactly one)")
    if needs_base(cfg.merge_method) and cfg.base_model is None:
        raise BricksError(f"{path}: merge method {cfg.merge_method!r} needs base_model")
    if cfg.tokenizer_source and cfg.tokenizer:
        raise BricksError(f"{path}: give tokenizer_source or tokenizer, not both")
    if cfg.vocabulary_source == "base" and cfg.base_model is None:
        raise BricksError(f"{path}: tokenizer source 'base' needs a base_model")
    if cfg.chat_template not in (None, "auto"):
        try:
            chat_template(cfg.chat_template, [])
        except BricksError as exc:
            raise BricksError(f"{path}: {exc}") from None
    sources = [(m.model, [m.parameters]) for m in cfg.models or []]
    for i, sl in enumerate(cfg.slices or []):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sl.sources}
        if not sl.sources or len(lengths) > 1:
            raise BricksError(f"{path}: slice {i}: every source must give the same number of layers, got "
                              f"{[list(s.layer_range) for s in sl.sources]}")
        if cfg.merge_method == "passthrough" and len(sl.sources) != 1:
            raise BricksError(f"{path}: slice {i}: passthrough copies one source per slice, got {len(sl.sources)}")
        if needs_base(cfg.merge_method) and cfg.base_model not in [s.model for s in sl.sources]:
            raise BricksError(f"{path}: slice {i}: base_model {cfg.base_model} must be among the slice's sources")
        sources += [(s.model, [s.parameters, sl.parameters]) for s in sl.sources]
    merged = {m for m, _ in sources} | {cfg.base_model}
    for token, rule in (cfg.tokenizer.tokens if cfg.tokenizer else {}).items():
        if rule.model is not None and rule.model not in merged:
            raise BricksError(f"{path}: tokenizer.tokens: {token!r} takes its rows from {rule.model!r}, which is not "
                              "one of the merged models: name one of them")
    try:
        check_params(cfg.merge_method, {k: values(v) for k, v in cfg.parameters.items()},
                     [{k: values(v) for p in levels for k, v in p.items()} for _, levels in sources])
    except BricksError as exc:
        raise BricksError(f"{path}: {exc}") from None
    # As in mergekit, the task-vector methods require a weight for every model but the base.
    missing = [m for m, levels in sources if m != cfg.base_model and not any("weight" in p for p in levels)
               and "weight" not in cfg.model_parameters(m) and "weight" not in cfg.parameters]
    if is_task_method(cfg.merge_method) and missing:
        raise BricksError(f"{path}: {cfg.merge_method} needs a weight for every model (missing for {', '.join(missing)})")
    return cfg

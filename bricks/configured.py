"""Configured models: a dense base checkpoint plus the bricks configuration that `bricks.load_model` re-applies.

A configured-model directory is a plain Hugging Face checkpoint of the base
model (so transformers alone still opens it, as the dense model) plus:

- `bricks_model.json`: format, kind ("moe"), router name, active fraction(s),
  compute target, budget, and the recovery record when recovery trained it;
- `bricks/`: the BrickSet (with the base model's fingerprint); absent for the
  `teal` router, whose bricks are the model's own neurons and input channels;
- `router.safetensors`: trained router parameters, when the router has any.

A configuration that changes no weight (the `teal` router without recovery)
is saved as a reference to its source model instead (`source`: the model
spec and its fingerprint, checked when the directory is opened): megabytes,
not a copy of the checkpoint.

In memory, the configuration of a model lives in one `Configuration` object
(`configuration(model)`), never in loose attributes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file

from .brick import BrickSet, model_fingerprint
from .adapters.lora import AdapterBrick
from .errors import BricksError
from .compress import load_compressed, load_source
from .compress.store import attach_saved
from .fusion import load_fused
from .io import atomic_dir, validated
from .loading import (CONFIGURED_FORMAT, CONFIGURED_MARKER, CONFIGURED_VERSION, DEFAULT_MODEL, absolute_spec, load_dense,
                      load_tokenizer, resolve, split_spec)
from .routing.base import dense_blocks, dense_state_dict
from .routing import (ROUTERS, BrickedFFN, allocate_budgets, assemble_bricked, assemble_sparse, calibrate_thresholds,
                      recover, routed_layers, set_thresholds, train_routers)

# Neuron-level magnitude sparsity (TEAL): the router that runs without a BrickSet.
SPARSE_ROUTER = "teal"

FORMAT, VERSION, MARKER = CONFIGURED_FORMAT, CONFIGURED_VERSION, CONFIGURED_MARKER
ATTRIBUTE = "bricks_configuration"  # where a model keeps its `Configuration`


@dataclass
class Configuration:
    """How a configured model runs: what `bricks_model.json` records, plus what saving and reporting need."""

    kind: str  # "moe"
    router: str
    active: float | list[float]  # share of routed bricks per token (per layer when a list); teal: the compute fraction
    compute: float | None = None  # the FFN compute target the actives were chosen for
    budget: str = "uniform"
    recovery: dict | None = None  # the record of recovery training (objective, steps, source model, ...)
    source: dict | None = None  # {"spec", "fingerprint"}: the weights are the source model's, not stored
    selection: str = "topk"  # teal: how each token's kept entries are chosen (topk, or calibrated thresholds)
    thresholds: list | None = None  # teal with threshold selection: (inputs, neurons) magnitudes per layer
    brickset: BrickSet | None = None  # saved under bricks/; None for teal
    dense_ffns: list = field(default_factory=list)  # the dense FFN modules' structure (meta device), for saving
    reports: dict = field(default_factory=dict)  # this run's router training, budget and recovery reports (not saved)

    def record(self) -> dict:
        """The `bricks_model.json` document."""
        doc = {"format": FORMAT, "version": VERSION, "kind": self.kind, "router": self.router, "active": self.active,
               "compute": self.compute, "budget": self.budget}
        extra = {"recovery": self.recovery, "source": self.source}
        if self.selection != "topk":
            extra.update(selection=self.selection, thresholds=self.thresholds)
        return {**doc, **{k: v for k, v in extra.items() if v is not None}}


def configuration(model) -> Configuration | None:
    """The bricks configuration `model` runs under (None for a plain dense model)."""
    return getattr(model, ATTRIBUTE, None)


class MoefyConfig(BaseModel):
    """Settings of `bricks moefy` and `moefy` (flags and YAML files share this schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    router: str = "centroid"  # a brick router (ROUTERS) or teal
    active: float | list[float] = 0.5  # share of routed bricks per token (teal: the FFN compute fraction)
    compute: float | None = None  # instead of active: the FFN compute fraction per layer
    budget: Literal["uniform", "sensitivity"] = "uniform"
    selection: Literal["topk", "threshold"] = "topk"  # teal: exact shares per token, or calibrated magnitudes
    windows: int = Field(32, ge=1)  # train windows per domain for router training (and threshold calibration)
    seq_len: int = Field(128, ge=2)
    epochs: int = Field(20, ge=1)  # router training epochs
    recover_steps: int = 0  # then fine-tune with the routers in the loop
    recover_windows: int = 512  # train windows per domain for recovery
    recover_lr: float = 5e-5
    recover_batch_size: int = 8
    recover_objective: Literal["distill", "lm"] = "distill"
    recover_refit_routers: bool = False
    recover_checkpoint: str | None = None  # a file: save recovery as it goes, resume from it

    @model_validator(mode="after")
    def _consistent(self):
        if self.router != SPARSE_ROUTER and self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}: choose from {ROUTERS.names()}, {SPARSE_ROUTER}")
        actives = self.active if isinstance(self.active, list) else [self.active]
        if not actives or not all(0 < a <= 1 for a in actives):
            raise ValueError(f"--active must be in (0, 1], got {self.active}")
        if self.compute is not None and not 0 < self.compute <= 1:
            raise ValueError(f"--compute must be in (0, 1], got {self.compute}")
        if (self.recover_steps < 0 or self.recover_windows < 1 or not self.recover_lr > 0 or self.recover_batch_size < 1
                or self.recover_lr == float("inf")):
            raise ValueError("recovery needs --recover-steps >= 0, --recover-windows >= 1, --recover-lr > 0 and "
                             "--recover-batch-size >= 1")
        if self.router == SPARSE_ROUTER and self.budget != "uniform":
            raise ValueError("--router teal has one compute fraction for every layer: drop --budget sensitivity")
        if self.selection != "topk" and self.router != SPARSE_ROUTER:
            raise ValueError(f"--selection {self.selection} chooses teal's kept entries: use it with --router teal")
        if self.router == SPARSE_ROUTER and isinstance(self.active, list):
            raise ValueError("the teal router takes one compute fraction, not one per layer")
        if self.budget == "sensitivity" and self.compute is None:
            raise ValueError("--budget sensitivity needs --compute F and --data NAME=SOURCE (calibration data)")
        if self.recover_checkpoint and not self.recover_steps:
            raise ValueError("--recover-checkpoint saves recovery training: give --recover-steps N too")
        return self

    @property
    def sparse(self) -> bool:
        return self.router == SPARSE_ROUTER

    @property
    def needs_training_data(self) -> bool:
        """Whether routers or budgets are fitted on data (train split)."""
        if self.sparse:
            return self.selection == "threshold"  # calibrated on data
        return ROUTERS.get(self.router).trainable or self.budget == "sensitivity"

    def check_inputs(self, has_bricks: bool, has_data: bool) -> None:
        """Refuse a missing or superfluous BrickSet, or missing data, before any model is loaded."""
        if self.sparse and has_bricks:
            raise BricksError("--router teal runs single neurons and input channels, not a BrickSet: drop --bricks")
        if not self.sparse and not has_bricks:
            raise BricksError(f"the {self.router} router routes bricks: give a BrickSet (on the command line: give --bricks DIR, made by bricks partition)")
        if not has_data and not self.sparse and ROUTERS.get(self.router).trainable:
            raise BricksError(f"router {self.router!r} must be trained: pass --data NAME=SOURCE (e.g. --data code=builtin:code)")
        if not has_data and self.selection == "threshold":
            raise BricksError("--selection threshold calibrates its magnitudes on data: pass --data NAME=SOURCE")
        if not has_data and self.budget == "sensitivity":
            raise BricksError("--budget sensitivity needs --compute F and --data NAME=SOURCE (calibration data)")
        if not has_data and self.recover_steps:
            raise BricksError("--recover-steps needs --data NAME=SOURCE (the text recovery trains on)")


def moefy(model, brickset: BrickSet | None, router: str = "centroid", active: float | list[float] = 0.5, train_domains=None,
          epochs: int = 20, compute: float | None = None, budget: str = "uniform", recover_windows=None,
          recover_steps: int = 0, recover_lr: float = 5e-5, recover_batch_size: int = 8, recover_objective: str = "distill",
          recover_refit_routers: bool = False, recover_checkpoint=None, selection: str = "topk", log=None):
    """Turn `model` (in place) into a MoE whose experts are the bricks of `brickset`.

    Trainable routers (`mlp`, `hybrid`, `threshold`) are trained or calibrated on
    `train_domains` (token windows, `bricks.load_domains(..., split="train")`).
    `budget="sensitivity"` (with `compute` and `train_domains`) gives each layer
    its own share of bricks by calibrated sensitivity (`bricks.routing.budget`).
    `recover_steps` > 0 then fine-tunes the whole model (routers frozen) on
    `recover_windows` (token windows `[n, seq]`) with the routers in the loop,
    by default distilling the dense model's next-token distribution
    (`bricks.routing.recovery`; `recover_refit_routers` lets MLP routers keep
    learning towards the current weights' oracle choice). `recover_checkpoint`
    (a file path) saves the recovery state as it goes; calling `moefy` again
    with the same arguments on the source model resumes from it. The reports
    of router training, budgets and recovery are in
    `configuration(model).reports`.

    `router="teal"` needs no BrickSet (pass None): its bricks are single
    neurons and input channels, chosen per token by magnitude
    (`bricks.routing.sparse_ffn`); `compute` (or else `active`) is then the FFN
    compute fraction of every layer, and there is nothing to train; with
    `selection="threshold"` each layer keeps the entries above magnitudes
    calibrated on `train_domains` (TEAL's choice, `calibrate_thresholds`), again
    after recovery if there is one.

    Example:
        >>> bs = bricks.BrickSet.load("runs/bricks")
        >>> bricks.moefy(model, bs, router="centroid", active=0.5)
        >>> bricks.save_configured(model, tok, "runs/moe")
    """
    cfg = validated(MoefyConfig, dict(router=router, active=list(active) if isinstance(active, (list, tuple)) else active,
                                      compute=compute, budget=budget, epochs=epochs, recover_steps=recover_steps,
                                      recover_lr=recover_lr, recover_batch_size=recover_batch_size,
                                      recover_objective=recover_objective, recover_refit_routers=recover_refit_routers,
                                      recover_checkpoint=None if recover_checkpoint is None else str(recover_checkpoint),
                                      selection=selection),
                    "moefy")
    cfg.check_inputs(brickset is not None, has_data=True)  # data: checked here as the API receives it
    if selection == "threshold" and not train_domains:
        raise BricksError("threshold selection is calibrated on data: pass train_domains (--data NAME=SOURCE on the CLI)")
    if budget == "sensitivity" and train_domains is None:
        raise BricksError("a sensitivity budget needs calibration data: pass train_domains (--data NAME=SOURCE on the CLI)")
    if recover_steps and recover_windows is None:
        raise BricksError("recovery training needs token windows: pass recover_windows (--data NAME=SOURCE on the CLI)")
    per_layer = isinstance(cfg.active, list)
    if cfg.sparse:
        originals = assemble_sparse(model, compute if compute is not None else cfg.active)
    else:
        originals = assemble_bricked(model, brickset, router=router, active=1.0 if per_layer else cfg.active, compute=compute)
    layers = [m for m in model.modules() if isinstance(m, BrickedFFN)]
    if per_layer:
        if len(cfg.active) != len(layers):
            raise BricksError(f"{len(cfg.active)} active fractions for {len(layers)} layers")
        for m, a in zip(layers, cfg.active):
            m.active = a
    # The dense modules' structure only (weights on the meta device, no memory): saving rebuilds their
    # tensors from the bricks, which hold every weight exactly once.
    state = Configuration("moe", router, cfg.active, compute, budget, brickset=brickset,
                          dense_ffns=[m.to("meta") for m in originals])
    setattr(model, ATTRIBUTE, state)
    if train_domains is not None and any(m.router is not None and m.router.trainable for m in layers):
        state.reports["router_training"] = train_routers(model, train_domains, epochs=epochs)
    if budget == "sensitivity":
        state.reports["budget"] = allocate_budgets(model, train_domains, compute)
    if cfg.sparse:
        state.active = compute if compute is not None else cfg.active
        if selection == "threshold":
            state.selection = selection
            state.thresholds = calibrate_thresholds(model, torch.cat([d.windows for d in train_domains]))
    elif compute is not None or per_layer:  # saved per layer, so that a reload runs the same bricks
        state.active = [m.active for m in layers]
    if recover_steps:
        report = recover(model, recover_windows, steps=recover_steps, lr=recover_lr, batch_size=recover_batch_size, log=log,
                         objective=recover_objective, refit_routers=recover_refit_routers, checkpoint=recover_checkpoint)
        state.reports["recovery"] = report
        # Saved weights are then the recovered ones; the source model is the dense baseline to compare with.
        state.recovery = {"objective": recover_objective, "steps": recover_steps, "lr": recover_lr,
                          "batch_size": recover_batch_size, "tokens": report["tokens"], "router_refit": recover_refit_routers,
                          "base_model": getattr(model.config, "_name_or_path", "") or None}
        if selection == "threshold":  # the weights moved: so did the magnitudes each share lies above
            state.thresholds = calibrate_thresholds(model, recover_windows)
    return model


def save_configured(model, tokenizer, out: str | Path, overwrite: bool = False, source: str | None = None) -> Path:
    """Write a configured model directory atomically (see the module docstring).

    `source`: the spec the model was loaded from ("default", a directory); when the configuration changes no
    weight, the directory then refers to it instead of holding a copy of its checkpoint.
    """
    state = configuration(model)
    if state is None:
        raise BricksError("this model has no bricks configuration to save: build one with bricks.moefy first")
    layers = routed_layers(model)
    blocks = dense_blocks(model, state.dense_ffns)  # the FFN tensors rebuilt from the routed ones, in neuron order
    if source is not None and state.router == SPARSE_ROUTER and state.recovery is None:
        reference = dataclasses.replace(state, source={"spec": absolute_spec(source), "fingerprint": model_fingerprint(model, blocks)})
        with atomic_dir(out, overwrite=overwrite) as tmp:
            tokenizer.save_pretrained(tmp)
            (tmp / MARKER).write_text(json.dumps(reference.record(), indent=1))
        return Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        # The checkpoint holds the dense base: the FFN tensors, rebuilt from the bricks, replace the bricked ones.
        model.save_pretrained(tmp, state_dict=dense_state_dict(model, blocks), safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        brickset = state.brickset  # None for teal: its bricks are the model's own neurons
        if brickset is not None:
            fingerprint = model_fingerprint(model, blocks)
            if fingerprint != brickset.fingerprint:  # recovery training changed the weights: the BrickSet now fits them
                info = {**brickset.info, "fingerprint_before_recovery": brickset.info.get("fingerprint_before_recovery",
                                                                                         brickset.fingerprint)}
                brickset = dataclasses.replace(brickset, fingerprint=fingerprint, info=info)
            brickset.save(tmp / "bricks", overwrite=True)
        router_state = {f"layers.{i}.{k}": v.detach().cpu().contiguous()
                        for i, layer in enumerate(layers) if getattr(layer, "router", None) is not None
                        for k, v in layer.router.state_dict().items() if layer.router.trainable}
        if router_state:
            save_file(router_state, str(tmp / "router.safetensors"))
        (tmp / MARKER).write_text(json.dumps(state.record(), indent=1))
    return Path(out)


def read_marker(path: Path) -> dict:
    """The `bricks_model.json` of a configured-model directory, checked to be one this version reads."""
    try:
        cfg = json.loads((path / MARKER).read_text())
    except json.JSONDecodeError as exc:
        raise BricksError(f"{path / MARKER} is not valid JSON: the configured model is corrupt") from exc
    if cfg.get("format") != FORMAT or cfg.get("version", 0) > VERSION:
        raise BricksError(f"{path / MARKER} is not a bricks configuration this version reads (format {cfg.get('format')!r})")
    return cfg


def _set_thresholds(model, cfg: dict, path: Path) -> None:
    """Threshold selection as it was calibrated: the saved magnitudes, one pair per layer."""
    if cfg["selection"] != "threshold":
        raise BricksError(f"{path / MARKER}: unknown selection {cfg['selection']!r}: the configured model is corrupt")
    set_thresholds(model, cfg.get("thresholds"), str(path / MARKER))
    state = configuration(model)
    state.selection, state.thresholds = "threshold", [list(t) for t in cfg["thresholds"]]


def load_configured(path: Path, model, cfg: dict | None = None) -> torch.nn.Module:
    """Re-apply the (MoE) configuration stored in `path` (its record `cfg`, else its marker) to its freshly loaded
    base `model`."""
    cfg = read_marker(path) if cfg is None else cfg
    unknown = set(cfg) - {"format", "version", "kind", "router", "active", "compute", "budget", "recovery", "source",
                          "selection", "thresholds"}
    if unknown:
        raise BricksError(f"{path / MARKER} has unknown keys {sorted(unknown)}")
    brickset = None if cfg.get("router") == SPARSE_ROUTER else BrickSet.load(path / "bricks")
    moefy(model, brickset, cfg["router"], cfg["active"])
    if cfg.get("selection", "topk") != "topk":
        _set_thresholds(model, cfg, path)
    # Kept as they were written: the compute target and budget the actives came from, the recovery record.
    state = configuration(model)
    state.compute, state.budget, state.recovery = cfg.get("compute"), cfg.get("budget", "uniform"), cfg.get("recovery")
    state.source = cfg.get("source")
    router_file = path / "router.safetensors"
    if router_file.is_file():
        weights = load_file(str(router_file))
        for i, layer in enumerate(m for m in model.modules() if isinstance(m, BrickedFFN)):
            own = {k.split(".", 2)[2]: v for k, v in weights.items() if k.startswith(f"layers.{i}.")}
            if own:
                layer.router.load_state_dict(own)
    return model


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, device: str | None = None, dtype="float32", device_map=None,
               configured: bool = True):
    """Load a causal LM and its tokenizer from local files, with its bricks configuration if it has one.

    A fused-model directory (`bricks fuse`) opens as its `FusedModel`; a compressed one (`bricks compress`) as the
    compressed checkpoint, and a CPET one (`bricks cpet`) with its LoRA and recovery bricks attached;
    `base+adapter` (mergekit's spelling) is the base with the adapter merged into its weights.

    Args:
        spec: "default" (SmolLM2-135M-Instruct), a local HF model directory, a .gguf file, or `base+adapter`.
        device: "cpu", "cuda", "cuda:1", ...; ignored when `device_map` is given.
        dtype: "float32", "bfloat16" or "float16" (or a torch dtype).
        device_map: e.g. "auto" to spread a large model over the available devices.
        configured: re-apply the bricks configuration of a directory written by
            `bricks moefy` (False: the dense base model it holds).

    Returns:
        (model, tokenizer), the model in eval mode.

    Example:
        >>> model, tokenizer = bricks.load_model("default")
    """
    base, adapter = split_spec(str(spec))
    if adapter is not None:
        model, tokenizer = load_dense(base, device, dtype, device_map)
        AdapterBrick.load(adapter).merge_into(model)
        return model, tokenizer
    given = Path(str(spec)).expanduser()
    doc = read_marker(given) if (given / MARKER).is_file() else {}
    if configured and doc.get("kind") == "fused":
        return load_fused(given, doc, device, dtype)  # full-model specialists: no checkpoint inside
    if doc.get("kind") == "cpet" and "moe" in doc.get("compression", {}):
        return _load_moefied_cpet(given, doc, device, dtype, configured)
    if doc.get("kind") in ("compressed", "cpet"):
        return load_compressed(given, doc, device, dtype, configured)
    if doc.get("source"):  # the weights are the source model's: load it, check it is the same, configure it
        model, tokenizer = load_source(given, doc, "run moefy again", device, dtype, device_map), load_tokenizer(given)
        if configured:
            load_configured(given, model)
        return model, tokenizer
    path = resolve(spec)
    model, tokenizer = load_dense(spec, device, dtype, device_map)
    if configured and (path / MARKER).is_file():
        load_configured(path, model)
    return model, tokenizer


def _load_moefied_cpet(path: Path, doc: dict, device, dtype, configured: bool):
    """A CPET directory on a MoEfied base: the base, its MoE configuration, then the bricks CPET trained on it."""
    moe = doc["compression"]["moe"]
    if moe.get("source"):  # a teal configuration that refers to its source model instead of copying it
        model, tokenizer = load_source(path, moe, "run moefy again", device, dtype), load_tokenizer(path)
    else:
        model, tokenizer = load_dense(path, device, dtype)
    if configured:
        load_configured(path, model, moe)
        attach_saved(model, path)
    return model.eval(), tokenizer

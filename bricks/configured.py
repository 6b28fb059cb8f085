"""Configured models: a base checkpoint plus the bricks configuration that `bricks.load_model` re-applies.

A configured-model directory is a plain Hugging Face checkpoint of the base
model (so transformers alone still opens it, as the dense model) plus:

- `bricks_model.json`: format, kind ("moe"), router name, active fraction;
- `bricks/`: the BrickSet (with the base model's fingerprint); absent for the
  `teal` router, whose bricks are the model's own neurons and input channels;
- `router.safetensors`: trained router parameters, when the router has any.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .arch import FFN
from .brick import BrickSet, atomic_dir, model_fingerprint
from .errors import BricksError
from .routing import BrickedFFN, assemble_bricked
from .routing.bricked_ffn import routed_layers
from .routing.sparse_ffn import assemble_sparse

# Neuron-level magnitude sparsity (TEAL): the router that runs without a BrickSet.
SPARSE_ROUTER = "teal"

FORMAT = "bricks.configured"
VERSION = 1
MARKER = "bricks_model.json"


def moefy(model, brickset: BrickSet | None, router: str = "centroid", active: float = 0.5, train_domains=None,
          epochs: int = 20, compute: float | None = None, budget: str = "uniform", recover_windows=None,
          recover_steps: int = 0, recover_lr: float = 5e-5, recover_batch_size: int = 8, recover_objective: str = "distill",
          recover_refit_routers: bool = False, recover_checkpoint=None, log=None):
    """Turn `model` (in place) into a MoE whose experts are the bricks of `brickset`.

    Trainable routers (`mlp`, `hybrid`, `threshold`) are trained or calibrated on
    `train_domains` (token windows, `bricks.load_domains(..., split="train")`);
    the per-layer report is kept in `model.bricks_router_report`.
    `budget="sensitivity"` (with `compute` and `train_domains`) gives each layer
    its own share of bricks by calibrated sensitivity (`bricks.routing.budget`);
    its report is kept in `model.bricks_budget_report`.
    `recover_steps` > 0 then fine-tunes the whole model (routers frozen) on
    `recover_windows` (token windows `[n, seq]`) with the routers in the loop,
    by default distilling the dense model's next-token distribution
    (`bricks.routing.recovery`; `recover_refit_routers` lets MLP routers keep
    learning towards the current weights' oracle choice); its report is kept
    in `model.bricks_recovery_report`. `recover_checkpoint` (a file path)
    saves the recovery state as it goes; calling `moefy` again with the same
    arguments on the source model resumes from it.

    `router="teal"` needs no BrickSet (pass None): its bricks are single
    neurons and input channels, chosen per token by magnitude
    (`bricks.routing.sparse_ffn`); `compute` (or else `active`) is then the FFN
    compute fraction of every layer, and there is nothing to train.

    Example:
        >>> bs = bricks.BrickSet.load("runs/bricks")
        >>> bricks.moefy(model, bs, router="centroid", active=0.5)
        >>> bricks.save_configured(model, tok, "runs/moe")
    """
    if budget not in ("uniform", "sensitivity"):
        raise BricksError(f"unknown budget {budget!r}: choose uniform or sensitivity")
    if budget == "sensitivity" and (compute is None or train_domains is None):
        raise BricksError("a sensitivity budget needs a compute target and calibration data (--compute F --data NAME=SOURCE)")
    per_layer = isinstance(active, (list, tuple))
    if router == SPARSE_ROUTER:
        if brickset is not None:
            raise BricksError("the teal router runs single neurons and input channels, not a BrickSet: drop --bricks")
        if budget != "uniform":
            raise BricksError("the teal router has one compute fraction for every layer: use --budget uniform")
        if per_layer:
            raise BricksError("the teal router takes one compute fraction, not one per layer")
        originals = assemble_sparse(model, compute if compute is not None else active)
    else:
        if brickset is None:
            raise BricksError(f"the {router} router routes bricks: give a BrickSet (--bricks DIR, made by bricks partition)")
        originals = assemble_bricked(model, brickset, router=router, active=1.0 if per_layer else active, compute=compute)
    layers = _bricked_layers(model)
    if per_layer:
        if len(active) != len(layers):
            raise BricksError(f"{len(active)} active fractions for {len(layers)} layers")
        for m, a in zip(layers, active):
            m.active = a
    # Keep the dense modules' structure only (weights on the meta device, no memory):
    # saving rebuilds their tensors from the bricks, which hold every weight exactly once.
    object.__setattr__(model, "bricks_dense_ffns", [m.to("meta") for m in originals])
    model.bricks_brickset = brickset
    if train_domains is not None and any(m.router is not None and m.router.trainable for m in layers):
        from .routing import train_routers

        model.bricks_router_report = train_routers(model, train_domains, epochs=epochs)
    if budget == "sensitivity":
        from .routing.budget import allocate_budgets

        model.bricks_budget_report = allocate_budgets(model, train_domains, compute)
    if router == SPARSE_ROUTER:
        active = compute if compute is not None else active
    elif compute is not None or per_layer:  # saved per layer, so that a reload runs the same bricks
        active = [m.active for m in layers]
    model.bricks_config = {"kind": "moe", "router": router, "active": active, "compute": compute, "budget": budget}
    if recover_steps:
        from .routing.recovery import recover

        if recover_windows is None:
            raise BricksError("recovery training needs token windows: pass recover_windows (--data NAME=SOURCE on the CLI)")
        report = recover(model, recover_windows, steps=recover_steps, lr=recover_lr, batch_size=recover_batch_size, log=log,
                         objective=recover_objective, refit_routers=recover_refit_routers, checkpoint=recover_checkpoint)
        model.bricks_recovery_report = report
        # Saved weights are then the recovered ones; the source model is the dense baseline to compare with.
        model.bricks_config["recovery"] = {"objective": recover_objective, "steps": recover_steps, "lr": recover_lr,
                                           "batch_size": recover_batch_size, "tokens": report["tokens"],
                                           "router_refit": recover_refit_routers,
                                           "base_model": getattr(model.config, "_name_or_path", "") or None}
    return model


def _bricked_layers(model) -> list[BrickedFFN]:
    return [m for m in model.modules() if isinstance(m, BrickedFFN)]


def save_configured(model, tokenizer, out: str | Path, overwrite: bool = False) -> Path:
    """Write a configured model directory atomically (see the module docstring)."""
    if not hasattr(model, "bricks_config"):
        raise BricksError("this model has no bricks configuration to save: build one with bricks.moefy first")
    layers = routed_layers(model)
    from .arch import layout_for

    layout = layout_for(model)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        # The checkpoint holds the dense base: the FFN tensors, rebuilt from the bricks, replace the bricked ones.
        state = {k: v for k, v in model.state_dict().items() if f".{layout.mlp}." not in k}
        blocks = []
        for i, (skeleton, routed) in enumerate(zip(model.bricks_dense_ffns, layers)):
            dense = copy.deepcopy(skeleton).to_empty(device=next(routed.parameters()).device)
            blocks.append(FFN(None, i, layout, module=dense))
            routed.write_dense(blocks[-1])
            state.update({f"{layout.layers}.{i}.{layout.mlp}.{k}": v for k, v in dense.state_dict().items()})
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        brickset = model.bricks_brickset  # None for teal: its bricks are the model's own neurons
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
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "version": VERSION, **model.bricks_config}, indent=1))
    return Path(out)


def load_configured(path: Path, model) -> "torch.nn.Module":
    """Re-apply the configuration stored in `path` to its freshly loaded base `model`."""
    try:
        cfg = json.loads((path / MARKER).read_text())
    except json.JSONDecodeError as exc:
        raise BricksError(f"{path / MARKER} is not valid JSON: the configured model is corrupt") from exc
    if cfg.get("format") != FORMAT or cfg.get("version", 0) > VERSION:
        raise BricksError(f"{path / MARKER} is not a bricks configuration this version reads (format {cfg.get('format')!r})")
    unknown = set(cfg) - {"format", "version", "kind", "router", "active", "compute", "budget", "recovery"}
    if unknown:
        raise BricksError(f"{path / MARKER} has unknown keys {sorted(unknown)}")
    brickset = None if cfg.get("router") == SPARSE_ROUTER else BrickSet.load(path / "bricks")
    moefy(model, brickset, cfg["router"], cfg["active"])
    if "recovery" in cfg:  # informational: kept so that saving again keeps the record
        model.bricks_config["recovery"] = cfg["recovery"]
    router_file = path / "router.safetensors"
    if router_file.is_file():
        state = load_file(str(router_file))
        for i, layer in enumerate(_bricked_layers(model)):
            own = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"layers.{i}.")}
            if own:
                layer.router.load_state_dict(own)
    return model

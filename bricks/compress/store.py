"""Compressed and CPET directories: written here, opened by `bricks.load_model`.

- A **compressed** directory is a Hugging Face checkpoint of the compressed
  model (pruned weights as zeros; quantized ones in the library's format, with
  its `quantization_config` in config.json), so plain transformers opens it,
  plus `bricks_model.json`: kind "compressed", the compression report and the
  source model (spec and fingerprint; `bricks cpet` takes it as the teacher).
- A **teal** compressed directory holds no checkpoint: teal changes no
  weight, so the directory records the source model (spec and fingerprint,
  checked when it opens) and the calibrated thresholds, and opens as the
  source with sparse FFNs. After a pruning (wanda 2:4 + teal) it holds the
  pruned checkpoint, and opens as that with sparse FFNs.
- A **MoEfied** directory (`bricks moefy`: routed bricks, as CA-LoRA used
  MoEfication) is a compressed model too: `bricks cpet` takes it as
  COMPRESSED, its teacher the model its bricks were cut from (checked by the
  BrickSet's fingerprint).
- A **CPET** directory is a copy of the compressed (or MoEfied) directory plus
  `adapter/` (the LoRA brick, PEFT-exportable), `recovery/` (the recovery
  brick, when CPET trained one) and `bricks_model.json`: kind "cpet", the
  compression and training records (for a MoEfied base, its configuration
  under `compression.moe`). Plain transformers opens it as the compressed
  (or dense) base without bricks; `bricks.load_model` attaches them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..adapters.lora import AdapterBrick
from ..adapters.recovery import RecoveryBrick
from ..brick import BrickSet, model_fingerprint
from ..errors import BricksError
from ..io import atomic_dir
from ..loading import (CONFIGURED_FORMAT, CONFIGURED_MARKER, CONFIGURED_VERSION, absolute_spec, load_dense, load_tokenizer,
                       split_spec)
from ..routing.base import dense_blocks, dense_state_dict
from .build import apply_teal
from .cpet import CPETBricks, attach_cpet

FORMAT, VERSION, MARKER = CONFIGURED_FORMAT, CONFIGURED_VERSION, CONFIGURED_MARKER


def save_compressed(model, tokenizer, out: str | os.PathLike, report: dict, source: str, source_fingerprint: str,
                    overwrite: bool = False) -> Path:
    """Write a compressed-model directory atomically."""
    doc = {"format": FORMAT, "version": VERSION, "kind": "compressed", "compression": report,
           "source": {"spec": absolute_spec(source), "fingerprint": source_fingerprint}}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if "teal" not in report:
            model.save_pretrained(tmp, safe_serialization=True)
        elif "pruning" in report:  # pruned, then teal: the pruned weights, as the dense checkpoint they are
            model.save_pretrained(tmp, state_dict=dense_state_dict(model, dense_blocks(model)), safe_serialization=True)
        # else teal alone: the weights are the source's, and the record refers to them
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(doc, indent=1))
    return Path(out)


def read_compressed(path: str | os.PathLike) -> dict:
    """The record of a compressed directory, or a one-line error saying what the directory is instead."""
    path = Path(path)
    try:
        doc = json.loads((path / MARKER).read_text())
    except FileNotFoundError:
        raise BricksError(f"{path} is not a compressed model (no {MARKER}): make one with bricks compress") from None
    except json.JSONDecodeError as exc:
        raise BricksError(f"{path / MARKER} is not valid JSON: the directory is corrupt") from exc
    if doc.get("kind") == "moe":
        return _moefied(path, doc)
    if doc.get("kind") != "compressed":
        raise BricksError(f"{path} is a {doc.get('kind')!r} directory, not a compressed model: make one with bricks compress "
                          "(or bricks moefy)")
    return doc


def _moefied(path: Path, doc: dict) -> dict:
    """A MoEfied directory seen as a compressed one: its configuration as the compression, and the model its bricks
    were cut from as the source (the spec when the directory refers to it; the fingerprint from its BrickSet)."""
    source = dict(doc.get("source") or {})
    if doc.get("router") != "teal":  # teal's bricks are the model's own neurons: no BrickSet
        brickset = BrickSet.load(path / "bricks")
        source["fingerprint"] = brickset.info.get("fingerprint_before_recovery", brickset.fingerprint)
    active = doc["active"] if isinstance(doc["active"], (int, float)) else sum(doc["active"]) / len(doc["active"])
    label = f"moefied ({doc.get('router')} router, {active:.0%} active{', recovered' if doc.get('recovery') else ''})"
    return {"kind": "compressed", "compression": {"label": label, "moe": doc}, "source": source}


def teacher_spec(doc: dict, compressed: Path, given: str | None) -> str:
    """The teacher model: the one given, else the compressed model's recorded source, which must still exist."""
    if given is not None:
        return given
    spec = doc.get("source", {}).get("spec")
    if spec is None:
        raise BricksError(f"{compressed} records no source model: give the uncompressed model with --teacher")
    if spec != "default" and not all(Path(p).exists() for p in spec.split("+")):
        raise BricksError(f"the source model of {compressed}, {spec}, no longer exists: give the uncompressed model "
                          "with --teacher MODEL")
    return spec


def check_teacher(teacher, doc: dict, compressed: Path, spec: str) -> None:
    """The teacher is the model the compressed one was made from (compared by fingerprint)."""
    want = doc.get("source", {}).get("fingerprint")
    if want is not None and model_fingerprint(teacher) != want:
        raise BricksError(f"teacher {spec} is not the model {compressed} was compressed from (fingerprint "
                          f"{model_fingerprint(teacher)}, recorded {want}): give that model as --teacher")


def save_cpet(bricks: CPETBricks, compressed: str | os.PathLike, out: str | os.PathLike, record: dict, name: str = "cpet",
              overwrite: bool = False) -> Path:
    """Write a CPET directory: the compressed checkpoint copied from `compressed`, the bricks, the record."""
    compressed = Path(compressed)
    doc = read_compressed(compressed)
    lora, recovery = bricks.lora_brick(name), bricks.recovery_brick(f"{name}-recovery")
    marker = {"format": FORMAT, "version": VERSION, "kind": "cpet", "compression": doc["compression"],
              "source": doc.get("source"), **record}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for f in compressed.iterdir():
            if f.is_file() and f.name != MARKER:
                shutil.copy2(f, tmp / f.name)
            elif f.is_dir() and "moe" in doc["compression"]:  # the BrickSet of a MoEfied base
                shutil.copytree(f, tmp / f.name)
        lora.save(tmp / "adapter")
        if recovery is not None:
            recovery.save(tmp / "recovery")
        (tmp / MARKER).write_text(json.dumps(marker, indent=1))
    return Path(out)


def load_source(path: Path, doc: dict, remedy: str, device=None, dtype="float32", device_map=None):
    """The source model a directory without weights refers to (`doc["source"]`: spec and fingerprint), checked to
    be the one it was made from; `remedy` says what to do when it has changed."""
    spec = doc["source"]["spec"]
    base, adapter = split_spec(spec)
    model, _ = load_dense(base, device, dtype, device_map)
    if adapter is not None:
        AdapterBrick.load(adapter).merge_into(model)
    want = doc["source"].get("fingerprint")
    if want is not None and model_fingerprint(model) != want:
        raise BricksError(f"{path} refers to {spec}, which has changed since (fingerprint {model_fingerprint(model)}, "
                          f"was {want}): {remedy}")
    return model


def load_compressed(path: Path, doc: dict, device=None, dtype="float32", configured: bool = True):
    """(model, tokenizer) of a compressed or CPET directory whose `bricks_model.json` is `doc`."""
    teal = doc.get("compression", {}).get("teal")
    if teal is not None and "pruning" in doc["compression"]:  # the pruned checkpoint is here
        model, tokenizer = load_dense(path, device, dtype)
        if configured or doc.get("kind") == "cpet":
            apply_teal(model, teal, str(path / MARKER))
    elif teal is not None:
        teacher_spec(doc, path, None)  # a source that is gone: one line saying so
        model, tokenizer = load_source(path, doc, "compress it again", device, dtype), load_tokenizer(path)
        if configured or doc.get("kind") == "cpet":  # a CPET model's bricks were trained on the sparse FFNs
            apply_teal(model, teal, str(path / MARKER))
    else:
        model, tokenizer = load_dense(path, device, dtype)
    if doc.get("kind") == "cpet" and configured:
        attach_saved(model, path)
    return model.eval(), tokenizer


def attach_saved(model, path: Path) -> None:
    """Attach the LoRA and recovery bricks a CPET directory holds to its base `model` (configured as it trained)."""
    lora = AdapterBrick.load(path / "adapter")
    recovery = RecoveryBrick.load(path / "recovery") if (path / "recovery").is_dir() else None
    attach_cpet(model, lora, recovery=recovery, recovery_rank=None)

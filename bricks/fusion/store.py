"""Fused-model directories: written by `save_fused`, opened by `bricks.load_model`.

- `bricks_model.json`: format, kind "fused", the specialists (names; for full
  models their paths and fingerprints), the gate's shape, the training record;
- `gate.safetensors`: the gate's weights;
- adapter specialists: the base checkpoint itself (plain transformers opens
  the directory as the base model) and `specialists/NAME/`, one adapter brick
  each; full-model specialists are referenced, not copied (they may be large),
  and a specialist that is missing or changed (fingerprint) is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file

from ..adapters.lora import AdapterBrick
from ..brick import model_fingerprint
from ..errors import BricksError
from ..io import atomic_dir
from ..loading import (CONFIGURED_FORMAT, CONFIGURED_MARKER, CONFIGURED_VERSION, absolute_spec, load_dense, load_tokenizer,
                       split_spec)
from .model import AdapterSpecialists, FusedModel, FusionGate, ModelSpecialists, chat_templates

FORMAT, VERSION, MARKER = CONFIGURED_FORMAT, CONFIGURED_VERSION, CONFIGURED_MARKER


def save_fused(fused: FusedModel, tokenizer, out: str | os.PathLike, sources: list[str] | None = None,
               training: dict | None = None, overwrite: bool = False) -> Path:
    """Write a fused-model directory atomically. `sources`: where full-model specialists were loaded from."""
    spec = fused.specialists
    first = fused.gate.first[0]
    doc = {"format": FORMAT, "version": VERSION, "kind": "fused", "specialist_kind": spec.kind, "names": fused.names,
           "gate": {"width": first.out_features, "hidden_sizes": spec.hidden_sizes}, "training": training}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if isinstance(spec, AdapterSpecialists):
            # The base as loaded: the wrappers that stack the adapters are left out of its tensor names.
            # The base as loaded: without the stacked factors (saved in the bricks), under its own tensor names.
            state = spec.base.state_dict()
            for name in spec.multi.layers:
                state = {k.replace(f"{name}.base.", f"{name}."): v for k, v in state.items()
                         if k not in (f"{name}.A", f"{name}.B")}
            spec.base.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            for brick in spec.multi.bricks:
                brick.save(tmp / "specialists" / brick.name)
        else:
            if sources is None or len(sources) != len(spec.names):
                raise BricksError("saving full-model specialists needs the path each was loaded from (sources)")
            doc["models"] = [{"path": absolute_spec(s), "fingerprint": model_fingerprint(m)} for s, m in zip(sources, spec.models)]
        tokenizer.save_pretrained(tmp)
        save_file({k: v.detach().cpu().contiguous() for k, v in fused.gate.state_dict().items()}, str(tmp / "gate.safetensors"))
        (tmp / MARKER).write_text(json.dumps(doc, indent=1))
    return Path(out)


def load_fused(path: Path, doc: dict, device=None, dtype="float32"):
    """(FusedModel, tokenizer) of a fused-model directory whose `bricks_model.json` is `doc`."""
    names = doc["names"]
    if doc.get("specialist_kind") == "adapters":
        base, tokenizer = load_dense(path, device, dtype)
        bricks = []
        for n in names:
            brick = AdapterBrick.load(path / "specialists" / n)
            brick.name = n
            bricks.append(brick)
        specialists = AdapterSpecialists(base, bricks)
    else:
        models, templates = [], []
        for ref in doc["models"]:
            model_path, adapter = split_spec(ref["path"])
            if not all(Path(p).exists() or p == "default" for p in (model_path, adapter) if p is not None):
                raise BricksError(f"specialist {ref['path']} of the fused model {path} no longer exists: restore it, "
                                  "or fuse again")
            m, tokenizer = load_dense(model_path, device, dtype)
            templates.append(tokenizer)
            if adapter is not None:
                AdapterBrick.load(adapter).merge_into(m)
            if model_fingerprint(m) != ref["fingerprint"]:
                raise BricksError(f"specialist {ref['path']} changed since {path} was fused (fingerprint "
                                  f"{model_fingerprint(m)}, was {ref['fingerprint']}): fuse again")
            models.append(m)
        specialists = ModelSpecialists(models, names)
        tokenizer = load_tokenizer(path)
    gate = FusionGate(doc["gate"]["hidden_sizes"], doc["gate"]["width"])
    try:
        gate.load_state_dict(load_file(str(path / "gate.safetensors")))
    except Exception as exc:
        raise BricksError(f"cannot read the gate of {path}: {str(exc).splitlines()[0]}; the directory is corrupt") from exc
    fused = FusedModel(specialists, gate)
    if doc.get("specialist_kind") != "adapters":
        fused.chat_templates = chat_templates(templates)
    return fused.eval(), tokenizer

"""Bricks and BrickSets, and their on-disk format.

An emergent brick is a group of FFN neurons of one layer: `(layer, neuron indices)`
on the neuron axis (see `bricks.arch`). A `BrickSet` is a partition of every
layer's neurons into bricks: each layer's `assignment[i]` is the brick of neuron
`i`, so every neuron lies in exactly one brick (an exact cover by construction).

On disk a BrickSet is a directory:

- `bricks.json`: format name and version, kind, method and parameters, the
  source model's fingerprint, and per-layer brick metadata;
- `bricks.safetensors`: `layers.{i}.assignment` (int64 `[d_ff]`) per layer.

Writes are atomic (temporary sibling, then rename); loading checks the format,
and applying a BrickSet to a model checks the fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .arch import ffns, layout_for
from .errors import BricksError
from .io import atomic_dir

FORMAT = "bricks.brickset"
VERSION = 1


def model_fingerprint(model, blocks=None) -> str:
    """Identity of a model's FFNs: shapes and a strided sample of weight values.

    Values are compared at bfloat16 precision so that one checkpoint loaded in
    fp32, fp16 or bf16 has one fingerprint. `blocks`: the FFN handles to use
    instead of the model's own (a bricked model's dense equivalents).
    """
    h = hashlib.sha256(layout_for(model).layers.encode())
    h.update(model.config.model_type.encode())
    for f in blocks if blocks is not None else ffns(model):
        for w in (f.up_weight(), f.down_weight()):
            h.update(str(tuple(w.shape)).encode())
            flat = w.detach().reshape(-1)
            # float32 linspace can round the last index past the end on large tensors: clamped (same indices else)
            idx = torch.linspace(0, flat.numel() - 1, 64).long().clamp_(max=flat.numel() - 1).to(flat.device)
            h.update(flat[idx].to(torch.bfloat16).float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


@dataclass(frozen=True, eq=False)  # tensors inside: compare neurons explicitly
class Brick:
    """One emergent brick: a set of neurons of one layer's FFN."""

    layer: int
    index: int
    neurons: torch.Tensor  # sorted int64 neuron indices
    shared: bool = False  # always-active neurons set aside from routing
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def size(self) -> int:
        return len(self.neurons)


@dataclass
class BrickSet:
    """A partition of each layer's FFN neurons into emergent bricks.

    Args:
        assignments: per layer, `[d_ff]` int64 brick index of every neuron.
        fingerprint: `model_fingerprint` of the model it was made from.
        shared: per layer, the brick index holding always-active shared neurons (or None).
        meta: per layer, per brick metadata dicts (JSON-serialisable).
        info: free JSON metadata (method, parameters, source model).
    """

    assignments: list[torch.Tensor]
    fingerprint: str
    kind: str = "emergent"
    method: str = ""
    shared: list[int | None] = field(default_factory=list)
    meta: list[list[dict]] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.assignments = [torch.as_tensor(a, dtype=torch.int64).cpu() for a in self.assignments]
        if not self.shared:
            self.shared = [None] * len(self.assignments)
        if not self.meta:
            self.meta = [[{} for _ in range(self.n_bricks(i))] for i in range(len(self.assignments))]
        self.validate()

    # ---- structure
    @property
    def n_layers(self) -> int:
        return len(self.assignments)

    def n_bricks(self, layer: int) -> int:
        return int(self.assignments[layer].max()) + 1 if self.assignments[layer].numel() else 0

    def bricks(self, layer: int) -> list[Brick]:
        a = self.assignments[layer]
        return [
            Brick(layer, b, torch.nonzero(a == b).flatten(), b == self.shared[layer], self.meta[layer][b])
            for b in range(self.n_bricks(layer))
        ]

    def validate(self) -> None:
        """Every layer's bricks are non-empty and cover each neuron exactly once."""
        if len(self.shared) != self.n_layers or len(self.meta) != self.n_layers:
            raise BricksError("BrickSet metadata does not match its number of layers")
        for i, a in enumerate(self.assignments):
            if a.ndim != 1 or a.numel() == 0 or int(a.min()) < 0:
                raise BricksError(f"layer {i}: a brick assignment must be a non-empty vector of brick indices >= 0")
            sizes = torch.bincount(a)
            if (sizes == 0).any():
                raise BricksError(f"layer {i}: brick {int((sizes == 0).nonzero()[0])} is empty; brick indices must be 0..n-1")
            if len(self.meta[i]) != len(sizes):
                raise BricksError(f"layer {i}: {len(self.meta[i])} metadata entries for {len(sizes)} bricks")

    # ---- model compatibility
    def check_model(self, model) -> None:
        """Refuse a model other than the one this BrickSet was made from."""
        fp = model_fingerprint(model)
        if fp != self.fingerprint:
            src = self.info.get("model", "another model")
            raise BricksError(
                f"this BrickSet was made from {src} (fingerprint {self.fingerprint}), not from this model "
                f"(fingerprint {fp}); run `bricks partition` on this model instead"
            )

    # ---- weights
    def brick_weights(self, model, layer: int) -> list[dict[str, torch.Tensor]]:
        """Copies of each brick's weight slices in `layer`: neuron indices plus gate/up rows, down columns, biases."""
        f = ffns(model)[layer]
        parts = f.neuron_parts()
        return [{"neurons": b.neurons.clone(), **{k: v.detach()[b.neurons.to(v.device)].clone() for k, v in parts.items()}}
                for b in self.bricks(layer)]

    @torch.no_grad()
    def reassemble(self, model, pieces: list[list[dict[str, torch.Tensor]]]) -> None:
        """Write bricks' weight slices (from `brick_weights`) back into `model`'s FFNs, in place.

        Every neuron-axis weight is cleared first, so a neuron that no brick
        covers would stay zero: with an exact cover the FFN is rebuilt bit for bit.
        """
        self.check_model(model)
        for f, layer_pieces in zip(ffns(model), pieces):
            parts = f.neuron_parts()
            for t in parts.values():
                t.zero_()
            for piece in layer_pieces:
                for k, t in parts.items():
                    t[piece["neurons"].to(t.device)] = piece[k].to(t.device, t.dtype)

    # ---- disk format
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the BrickSet directory atomically."""
        path = Path(path)
        with atomic_dir(path, overwrite=overwrite) as tmp:
            save_file({f"layers.{i}.assignment": a.contiguous() for i, a in enumerate(self.assignments)},
                      str(tmp / "bricks.safetensors"), metadata={"format": FORMAT})
            doc = {
                "format": FORMAT,
                "version": VERSION,
                "kind": self.kind,
                "method": self.method,
                "fingerprint": self.fingerprint,
                "info": self.info,
                "layers": [
                    {"layer": i, "d_ff": int(a.numel()), "shared_brick": self.shared[i],
                     "bricks": [{"index": b, "size": int(s), **self.meta[i][b]} for b, s in enumerate(torch.bincount(a).tolist())]}
                    for i, a in enumerate(self.assignments)
                ],
            }
            (tmp / "bricks.json").write_text(json.dumps(doc, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BrickSet":
        path = Path(path)
        meta_file, tensor_file = path / "bricks.json", path / "bricks.safetensors"
        if not meta_file.is_file() or not tensor_file.is_file():
            raise BricksError(f"{path} is not a BrickSet directory (needs bricks.json and bricks.safetensors); make one with `bricks partition`")
        try:
            doc = json.loads(meta_file.read_text())
        except json.JSONDecodeError as exc:
            raise BricksError(f"{meta_file} is not valid JSON ({exc.msg}): the BrickSet is corrupt; re-create it") from exc
        if doc.get("format") != FORMAT:
            raise BricksError(f"{meta_file} is not a BrickSet description (format {doc.get('format')!r})")
        if doc.get("version", 0) > VERSION:
            raise BricksError(f"{path} uses BrickSet format version {doc['version']}; this bricks reads up to {VERSION}: upgrade bricks")
        try:
            tensors = load_file(str(tensor_file))
        except Exception as exc:
            raise BricksError(f"cannot read {tensor_file}: {exc}; the BrickSet is corrupt, re-create it") from exc
        layers = doc["layers"]
        try:
            assignments = [tensors[f"layers.{i}.assignment"] for i in range(len(layers))]
        except KeyError as exc:
            raise BricksError(f"{tensor_file} lacks {exc.args[0]}: the BrickSet is corrupt; re-create it") from exc
        meta = [[{k: v for k, v in b.items() if k not in ("index", "size")} for b in layer["bricks"]] for layer in layers]
        bs = cls(assignments, doc["fingerprint"], doc.get("kind", "emergent"), doc.get("method", ""),
                 [layer.get("shared_brick") for layer in layers], meta, doc.get("info", {}))
        for i, layer in enumerate(layers):
            if [b["size"] for b in layer["bricks"]] != torch.bincount(bs.assignments[i]).tolist():
                raise BricksError(f"{path}: bricks.json and bricks.safetensors disagree on layer {i}; the BrickSet is corrupt")
        return bs

    def __eq__(self, other) -> bool:
        return (isinstance(other, BrickSet) and self.fingerprint == other.fingerprint and self.kind == other.kind
                and self.method == other.method and self.shared == other.shared and self.meta == other.meta
                and self.info == other.info and len(self.assignments) == len(other.assignments)
                and all(torch.equal(a, b) for a, b in zip(self.assignments, other.assignments)))

"""Merging: customized (adapter) bricks, merge methods on task vectors, out-of-core model merging."""

from .adapters import AdapterBrick, LoRAModule

__all__ = ["AdapterBrick", "LoRAModule"]

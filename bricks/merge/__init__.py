"""Merging: customized (adapter) bricks, merge methods on task vectors, out-of-core model merging."""

from .adapters import AdapterBrick, LoRAModule, merge_adapters, refactor

__all__ = ["AdapterBrick", "LoRAModule", "merge_adapters", "refactor"]

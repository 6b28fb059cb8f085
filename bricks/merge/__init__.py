"""Merging: merge methods on task vectors, models merged from a mergekit YAML, adapters merged in ΔW space,
and dense models assembled into a Mixtral MoE."""

from . import selective, spherical  # noqa: F401  (each registers its merge methods)
from .adapters import merge_adapters, refactor
from .methods import METHODS, merge
from .models import merge_models
from .moe import assemble_moe

__all__ = ["merge_adapters", "refactor", "METHODS", "merge", "merge_models", "assemble_moe"]

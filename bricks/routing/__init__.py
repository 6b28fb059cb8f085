"""Routing: FFNs that run a share of their compute per token (emergent bricks chosen by a router, or single
neurons and input channels chosen by magnitude), their routers, budgets and recovery training."""

from .base import (RoutedFFN, compute_fraction, executed_fraction, routed_fraction, routed_layers, selection_fraction, set_dense_fallback,
                   set_path)
from .assembly import assemble_bricked, assemble_sparse, bricked, sparsified
from .bricked_ffn import BrickedFFN
from .budget import allocate_budgets
from .recovery import recover
from .router_training import train_routers
from .routers import ROUTERS, Router, make_router
from .sparse_ffn import SparseFFN
from .thresholds import calibrate_thresholds, set_thresholds
from .verify import verify_bricks

__all__ = ["RoutedFFN", "compute_fraction", "executed_fraction", "routed_fraction", "routed_layers", "selection_fraction",
           "set_dense_fallback", "set_path", "BrickedFFN", "assemble_bricked", "bricked", "allocate_budgets", "recover",
           "train_routers", "ROUTERS", "Router", "make_router", "SparseFFN", "calibrate_thresholds", "set_thresholds", "assemble_sparse",
           "sparsified", "verify_bricks"]

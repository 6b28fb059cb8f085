"""Routing: executing FFNs as emergent bricks, all of them or those a router selects."""

from .bricked_ffn import BrickedFFN, assemble_bricked, bricked, compute_fraction, executed_fraction, routed_layers, verify_bricks
from .routers import ROUTERS, Router, make_router, train_routers
from .sparse_ffn import SparseFFN, assemble_sparse, sparsified

__all__ = ["BrickedFFN", "assemble_bricked", "bricked", "compute_fraction", "executed_fraction", "routed_layers", "verify_bricks",
           "ROUTERS", "Router", "make_router", "train_routers", "SparseFFN", "assemble_sparse", "sparsified"]

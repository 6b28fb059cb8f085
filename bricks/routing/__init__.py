"""Routing: executing FFNs as emergent bricks."""

from .bricked_ffn import BrickedFFN, assemble_bricked, bricked, verify_bricks

__all__ = ["BrickedFFN", "assemble_bricked", "bricked", "verify_bricks"]

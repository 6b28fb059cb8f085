"""Fusion: specialist models (or adapter bricks on one base) fused by a token-level gate (UltraFuser)."""

from .build import compare_fusion, fuse
from .plots import plot_gate_shares, plot_token_gates
from .model import AdapterSpecialists, FusedModel, FusedOutput, FusionGate, ModelSpecialists
from .store import load_fused, save_fused
from .training import fused_loss, gate_shares, train_fusion

__all__ = ["compare_fusion", "fuse", "AdapterSpecialists", "FusedModel", "FusedOutput", "FusionGate",
           "ModelSpecialists", "load_fused", "save_fused", "fused_loss", "gate_shares", "train_fusion",
           "plot_gate_shares", "plot_token_gates"]

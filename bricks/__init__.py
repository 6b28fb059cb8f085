"""bricks: treat a pre-trained transformer as configurable bricks.

Public API::

    model, tok = bricks.load_model("default")
    report = bricks.analyze(model, tok, ["code=builtin:code", "math=builtin:math"], out="runs/a")
    stats = bricks.capture_stats(model, bricks.load_domains(["code=builtin:code"], tok))
    bs = bricks.partition(model, "coactivation", 64, stats)
    bs.save("runs/bricks"); bricks.BrickSet.load("runs/bricks")
    bricks.moefy(model, bs, router="mlp", compute=0.5, train_domains=train, budget="sensitivity")
    bricks.evaluate(model, bricks.load_domains(["code=builtin:code"], tok, "heldout"))
"""

from .analysis import (AnalyzeConfig, NeuronStats, analyze, capture_stats, cett_ppl_search, ffn_hooks, func_scores,
                       partition, perplexity)
from .arch import ARCHITECTURES, FFN, ffns, layout_for, supported_model_types
from .brick import Brick, BrickSet, model_fingerprint
from .configured import moefy, save_configured
from .data import DataSpec, Domain, load_domains, windows
from .errors import BricksError
from .evaluate import evaluate
from .loading import load_model, model_info
from .routing import (BrickedFFN, SparseFFN, assemble_bricked, assemble_sparse, bricked, compute_fraction, executed_fraction,
                      train_routers, verify_bricks)
from .routing.budget import allocate_budgets

__version__ = "0.1.0"

__all__ = [
    "AnalyzeConfig", "NeuronStats", "analyze", "capture_stats", "cett_ppl_search", "ffn_hooks", "func_scores",
    "partition", "perplexity", "ARCHITECTURES", "FFN", "ffns", "layout_for", "supported_model_types", "Brick",
    "BrickSet", "model_fingerprint", "DataSpec", "Domain", "load_domains", "windows", "BricksError", "load_model",
    "model_info", "moefy", "save_configured", "BrickedFFN", "SparseFFN", "assemble_bricked", "assemble_sparse", "bricked",
    "verify_bricks",
    "compute_fraction", "executed_fraction", "train_routers", "allocate_budgets", "evaluate",
]

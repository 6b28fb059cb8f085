"""bricks: treat a pre-trained transformer as configurable bricks.

Public API::

    model, tok = bricks.load_model("default")
    report = bricks.analyze(model, tok, ["code=builtin:code", "math=builtin:math"], out="runs/a")
    stats = bricks.capture_stats(model, bricks.load_domains(["code=builtin:code"], tok))
    bs = bricks.partition(model, "coactivation", 64, stats)
    bs.save("runs/bricks"); bricks.BrickSet.load("runs/bricks")
    bricks.moefy(model, bs, router="mlp", compute=0.5, train_domains=train, budget="sensitivity")
    bricks.evaluate(model, bricks.load_domains(["code=builtin:code"], tok, "heldout"))
    small, report = bricks.compress(model, tok, bricks.CompressConfig(methods=["wanda"], pattern="2:4"), calibration)
    student = bricks.attach_cpet(small, bricks.AdapterBrick.load("runs/lora")); bricks.train_cpet(student, teacher, windows)
"""

from .adapters import AdapterBrick, attach_adapters, fit_router, train_lora
from .analysis import (AnalyzeConfig, NeuronStats, analyze, capture_stats, cett_ppl_search, ffn_hooks, func_scores,
                       partition, perplexity)
from .arch import ARCHITECTURES, FFN, ffns, layout_for, supported_model_types
from .brick import Brick, BrickSet, model_fingerprint
from .compress import CompressConfig, attach_cpet, compress, train_cpet
from .configured import Configuration, configuration, load_model, moefy, save_configured
from .data import DataSpec, Domain, load_domains, windows
from .errors import BricksError
from .evaluate import evaluate
from .loading import model_info
from .merge import merge_adapters, merge_models
from .routing import (BrickedFFN, SparseFFN, allocate_budgets, assemble_bricked, assemble_sparse, bricked, compute_fraction,
                      executed_fraction, recover, sparsified, train_routers, verify_bricks)

__version__ = "0.1.0"

__all__ = [
    "AdapterBrick", "attach_adapters", "fit_router", "train_lora",
    "AnalyzeConfig", "NeuronStats", "analyze", "capture_stats", "cett_ppl_search", "ffn_hooks", "func_scores",
    "partition", "perplexity", "ARCHITECTURES", "FFN", "ffns", "layout_for", "supported_model_types", "Brick",
    "BrickSet", "model_fingerprint", "CompressConfig", "attach_cpet", "compress", "train_cpet",
    "Configuration", "configuration", "load_model", "moefy", "save_configured",
    "DataSpec", "Domain", "load_domains", "windows", "BricksError", "evaluate", "model_info",
    "merge_adapters", "merge_models",
    "BrickedFFN", "SparseFFN", "allocate_budgets", "assemble_bricked", "assemble_sparse", "bricked", "compute_fraction",
    "executed_fraction", "recover", "sparsified", "train_routers", "verify_bricks",
]

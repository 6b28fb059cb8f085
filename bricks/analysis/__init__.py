"""Analysers of FFN neurons: capture, sparsity, specialization, co-activation, partitioning."""

from .capture import NeuronStats, capture_stats, ffn_hooks
from .coactivation import coactivation_graph, graph_modularity
from .partition import PARTITIONERS, partition
from .report import AnalyzeConfig, analyze
from .sparsity import activation_sample, cett_ppl_search, perplexity
from .specialization import ablation_matrix, average_precision, func_scores

__all__ = [
    "NeuronStats", "capture_stats", "ffn_hooks", "coactivation_graph", "graph_modularity", "PARTITIONERS",
    "partition", "AnalyzeConfig", "analyze", "activation_sample", "cett_ppl_search", "perplexity",
    "ablation_matrix", "average_precision", "func_scores",
]

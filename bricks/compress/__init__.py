"""A compressed base with customized bricks on top: compressors (pruning, quantization) and CPET recovery."""

from .build import COMPRESSORS, CompressConfig, compress, methods_with_bits
from .cpet import CPETBricks, CPETConfig, CPETLinear, attach_cpet, cpet_loss, train_cpet
from .pruning import measured_sparsity, nm_violations, parse_pattern, prune
from .quantization import bf16_bytes, differentiable_4bit, quantize, weight_bytes
from .store import load_compressed, load_source, read_compressed, save_compressed, save_cpet

__all__ = ["COMPRESSORS", "CompressConfig", "compress", "methods_with_bits", "CPETBricks", "CPETConfig", "CPETLinear",
           "attach_cpet", "cpet_loss", "train_cpet", "measured_sparsity", "nm_violations", "parse_pattern", "prune",
           "bf16_bytes", "differentiable_4bit", "quantize", "weight_bytes", "load_compressed", "load_source", "read_compressed",
           "save_compressed", "save_cpet"]

"""Compressors by name, their settings, and `compress`: pruning and/or quantization in one call.

A compression is a sequence of steps: at most one pruning (`magnitude`,
`wanda`; unstructured at a sparsity, or N:M) followed by at most one
quantization (`int8`, `int4`), e.g. Wanda 2:4 then int8. Or the toolkit's
own activation sparsity, `teal` (as CA-LoRA compressed with MoEfication):
every FFN becomes a `SparseFFN` that skips each token's small inputs and
activations, at calibrated thresholds; the weights stay as they are, so a
teal directory refers to its source model instead of copying it. teal also
follows an N:M pruning (CA-LoRA's mixes of pruning and MoEfication): the
pruned checkpoint is stored and teal is calibrated on it; it does not follow
a quantization (it reads float weights row by row). Settings are checked
before any model work.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import BricksError
from ..registry import Registry
from ..routing.assembly import assemble_sparse
from ..routing.base import RoutedFFN
from ..routing.sparse_ffn import SparseFFN
from ..routing.thresholds import calibrate_thresholds, set_thresholds
from .pruning import check_pattern, measured_sparsity, parse_pattern, prunable, prune
from .quantization import BITS, is_quantized, quantize

COMPRESSORS: Registry[str] = Registry("compression method")
COMPRESSORS.add("magnitude", "prune", "prune the smallest |W| of each layer (unstructured at --sparsity, or --pattern N:M)")
COMPRESSORS.add("wanda", "prune", "prune by |W|·||X||₂ per output row (Sun et al. 2023), calibrated on --data")
COMPRESSORS.add("int8", "quantize", "8-bit weight-only quantization, per output channel (torchao)")
COMPRESSORS.add("int4", "quantize", "4-bit NF4 weight-only quantization, blocks of 64 (bitsandbytes)")
COMPRESSORS.add("teal", "sparsify", "skip each token's small FFN inputs and activations (TEAL; thresholds calibrated on "
                "--data); --sparsity is the share of FFN compute skipped")


class CompressConfig(BaseModel):
    """Settings of `bricks compress` (flags and YAML files share this schema)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    methods: list[str]  # in order: at most one pruning, then at most one quantization or teal
    sparsity: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    pattern: str | None = None  # N:M, e.g. "2:4"
    windows: int = Field(64, ge=1)  # calibration windows (train split), for wanda
    eval_windows: int = Field(32, ge=1)  # held-out windows for the perplexity report
    seq_len: int = Field(128, ge=2)

    @model_validator(mode="after")
    def _consistent(self):
        if not self.methods:
            raise ValueError("give a compression method (--method M, or --bits 8|4)")
        for m in self.methods:
            if m not in COMPRESSORS:
                raise ValueError(f"unknown compression method {m!r}: choose from {COMPRESSORS.names()}")
        kinds = [COMPRESSORS.get(m) for m in self.methods]
        if "sparsify" in kinds and "quantize" in kinds:
            raise ValueError(f"teal reads float weights row by row and composes with a pruning, not a quantization, got "
                             f"{self.methods}: drop the quantization")
        if "sparsify" in kinds and self.sparsity is None:
            raise ValueError("teal needs --sparsity S in (0, 1), the share of FFN compute each token skips")
        if kinds.count("prune") > 1 or kinds.count("quantize") > 1 or kinds.count("sparsify") > 1:
            raise ValueError(f"at most one pruning and one quantization or teal, got {self.methods}")
        if kinds != sorted(kinds):  # "prune" < "quantize" < "sparsify": pruning decides on float weights, first
            raise ValueError(f"prune first: {self.methods} puts a quantization or teal before the pruning")
        if self.pattern is not None:
            parse_pattern(self.pattern)  # a malformed pattern is refused here, with the rest
        if "sparsify" in kinds and self.pattern is not None and "prune" not in kinds:
            raise ValueError("--pattern is for pruning: teal takes --sparsity only (add --method wanda for wanda 2:4 + teal)")
        if "prune" in kinds and "sparsify" in kinds and self.pattern is None:
            raise ValueError("with teal, --sparsity is teal's share of FFN compute: prune with --pattern N:M (e.g. 2:4)")
        if "prune" in kinds and "sparsify" not in kinds and (self.sparsity is None) == (self.pattern is None):
            raise ValueError("pruning needs either --sparsity S in (0, 1) or --pattern N:M (e.g. 2:4), not both")
        if not {"prune", "sparsify"} & set(kinds) and (self.sparsity is not None or self.pattern is not None):
            raise ValueError("--sparsity and --pattern are for pruning: add --method magnitude or wanda")
        return self

    @property
    def pruning(self) -> str | None:
        return next((m for m in self.methods if COMPRESSORS.get(m) == "prune"), None)

    @property
    def quantization(self) -> str | None:
        return next((m for m in self.methods if COMPRESSORS.get(m) == "quantize"), None)

    @property
    def sparsify(self) -> str | None:
        return next((m for m in self.methods if COMPRESSORS.get(m) == "sparsify"), None)

    @property
    def needs_data(self) -> bool:
        return self.pruning == "wanda" or self.sparsify == "teal"

    def label(self) -> str:
        """e.g. "wanda 2:4 + int8", "wanda 2:4 + teal 50%"."""
        parts = []
        if self.pruning:
            parts.append(f"{self.pruning} {self.pattern or f'{self.sparsity:.0%}'}")
        if self.quantization:
            parts.append(self.quantization)
        if self.sparsify:
            parts.append(f"teal {self.sparsity:.0%}")
        return " + ".join(parts)


def sparsify(model, compute: float, calibration: torch.Tensor) -> dict:
    """Every FFN of `model` (in place) as a teal `SparseFFN` at FFN compute `compute`, thresholds calibrated on
    `calibration`; returns the settings a directory records (`apply_teal` reapplies them)."""
    assemble_sparse(model, compute)
    thresholds = calibrate_thresholds(model, calibration)
    layers = [m for m in model.modules() if isinstance(m, SparseFFN)]
    return {"compute": compute, "compute_fraction": sum(m.compute_fraction() for m in layers) / len(layers),
            "thresholds": [list(t) for t in thresholds]}


def apply_teal(model, teal: dict, where: str) -> None:
    """Reapply recorded teal settings to the source model: sparse FFNs with their calibrated thresholds."""
    assemble_sparse(model, teal["compute"])
    set_thresholds(model, teal.get("thresholds"), where)


def methods_with_bits(methods: list[str], bits: int | None) -> list[str]:
    """`--bits 8|4` is the quantization step `int8` / `int4` at the end of the sequence."""
    if bits is None:
        return list(methods)
    if bits not in BITS:
        raise BricksError(f"--bits must be one of {sorted(BITS)}, got {bits}")
    return [*methods, BITS[bits]]


def check_model(model, cfg: CompressConfig) -> None:
    """What can be refused from the model's shapes alone, before calibration."""
    if not prunable(model):
        raise BricksError(f"{type(model).__name__} has no nn.Linear projections in its decoder blocks (GPT-2 style Conv1D?): "
                          "compression supports Linear projections only")
    if any(isinstance(m, RoutedFFN) for m in model.modules()):
        raise BricksError("this model's FFNs are routed already (a moefied model): compress its dense base instead")
    if cfg.sparsify and is_quantized(model):
        raise BricksError("teal reads float weights row by row and this model is quantized: compress the float model "
                          "with teal")
    if cfg.pruning and cfg.pattern:
        check_pattern(model, parse_pattern(cfg.pattern))


def compress(model, tokenizer, cfg: CompressConfig, calibration: torch.Tensor | None = None, log=None):
    """Compress `model` as `cfg` says: prune it in place, then (if asked) return a quantized copy.

    Returns (compressed model, report with the achieved sparsity).

    Example:
        >>> cfg = CompressConfig(methods=["wanda", "int8"], pattern="2:4")
        >>> small, report = compress(model, tok, cfg, calibration=train[0].windows)
    """
    check_model(model, cfg)
    if cfg.needs_data and (calibration is None or calibration.numel() == 0):
        raise BricksError(f"{cfg.pruning or cfg.sparsify} calibrates on the model's inputs: give calibration data "
                          "(--data NAME=SOURCE)")
    report = {"methods": cfg.methods, "label": cfg.label(), "sparsity": cfg.sparsity, "pattern": cfg.pattern}
    if cfg.pruning:
        if log:
            log(f"pruning ({cfg.pruning} {cfg.pattern or cfg.sparsity}) ...")
        report["pruning"] = prune(model, cfg.pruning, None if cfg.sparsify else cfg.sparsity, cfg.pattern, calibration)
    if cfg.sparsify:  # on the pruned weights, if pruned: the thresholds are those of the activations they give
        if log:
            log(f"sparsifying the FFNs (teal, {cfg.sparsity:.0%} of their compute skipped) ...")
        report["teal"] = sparsify(model, 1.0 - cfg.sparsity, calibration)
        report["achieved"] = {"sparsity": 1.0 - report["teal"]["compute_fraction"]}
        return model, report
    if cfg.quantization:
        if log:
            log(f"quantizing ({cfg.quantization}) ...")
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        model = quantize(model, tokenizer, cfg.quantization, dtype)
    if not cfg.quantization:
        report["achieved"] = measured_sparsity(model)
    else:
        report["achieved"] = report.get("pruning", {"sparsity": 0.0})
    return model, report

"""`bricks analyze`: sparsity, specialization and co-activation of a model's FFN neurons.

The run writes into its output directory (atomically):

- `report.json`  (schema below)
- `neurons.safetensors`  per-neuron tensors: `activation_frequency` [layers, d_ff],
  `mean_abs` [layers, d_ff], `domain_mean_abs` [layers, domains, d_ff],
  `func_score` [layers, domains, d_ff], `cett_eps` [layers]
- `sparsity.png`, `specialization.png`, `ablation.png`, `modularity.png`

report.json schema (version 1)::

    {
      "schema": "bricks.analysis", "version": 1,
      "model": {model_type, layers, hidden_size, d_ff, fingerprint, spec},
      "data": {"domains": [{name, source, train_windows, validation_windows, heldout_windows}], "seq_len", "train_tokens"},
      "config": {... AnalyzeConfig ...},
      "sparsity": {
        "definition": "CETT-PPL-p%",
        "p": 1.0,                      # target perplexity increase, percent
        "cett": 0.19,                  # CETT shared by all layers, searched on the validation split
        "validation": {"ppl_dense", "ppl_sparse", "increase"},   # where the search met p%
        "ppl_dense": .., "ppl_sparse": .., "achieved_increase": 0.0098,   # those thresholds on held-out data
        "activation_ratio": [per layer, held-out tokens], "mean_activation_ratio": ..,
        "sparsity": 1 - mean_activation_ratio,
        "threshold": [per-layer eps on the neuron output norm],
        "search": [{cett, ppl, increase, mean_activation_ratio}, ...],
        "curve": {"cett": [...], "mean_activation_ratio": [...]}   # CETT vs activation ratio
      },
      "specialization": {                # absent with a single domain
        "threshold": 0.8,
        "per_domain": {domain: {"best": [per layer], "share_above": [per layer], "layers_best_above": n}}
      },
      "ablation": {                      # absent with a single domain
        "fraction": 0.05, "domains": [...], "baseline": [ppl per domain],
        "ablated_ppl": [[ablated][evaluated]], "relative_change": [[ablated][evaluated]],
        "diagonal_dominates": true,      # rows: zeroing a domain's neurons hurts that domain more than any other
        "min_diagonal_margin": 2.6,      # smallest ratio own-domain change / largest other change, per row
        "column_diagonal_dominates": .., # columns: on each domain's text, its own neurons cost the most
        "min_column_margin": ..
      },
      "coactivation": {"k": 16, "per_layer": [{"modularity", "communities", "largest"}], "mean_modularity": ..}
    }
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from ..arch import ffns
from ..brick import model_fingerprint
from ..data import DataSpec, load_domains
from ..io import atomic_dir, check_output
from ..loading import model_info
from ..runtime import Timeline, progress, world
from .capture import capture_stats
from .coactivation import coactivation_graph, graph_modularity
from .sparsity import activation_sample, cett_ppl_search, perplexity, thresholded_perplexity
from .specialization import ablation_matrix, func_scores, specialization_summary


class AnalyzeConfig(BaseModel):
    """Token budgets and parameters of `bricks analyze` (defaults: ~5 min for the default model on 2 CPU cores)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq_len: int = Field(128, ge=16, description="tokens per window (one window = one sample)")
    windows: int = Field(48, ge=4, description="train windows per domain for neuron statistics")
    eval_windows: int = Field(12, ge=1, description="validation (CETT search) and held-out windows per domain for perplexity")
    calib_tokens: int = Field(1024, ge=64, description="tokens whose activations set the CETT thresholds")
    batch_size: int = Field(8, ge=1)
    ppl_increase: float = Field(1.0, gt=0, le=50, description="p of CETT-PPL-p%, in percent")
    ablate_fraction: float = Field(0.05, gt=0, lt=1, description="share of each layer's neurons ablated per domain")
    specialization_threshold: float = Field(0.8, gt=0, lt=1)
    coactivation_stride: int = Field(8, ge=1, description="count co-activation on every k-th token")
    graph_k: int = Field(16, ge=1, description="neighbours kept per neuron in the co-activation graph")
    seed: int = 0


def analyze(model, tokenizer, data: list[DataSpec | str], config: AnalyzeConfig | None = None,
            out: str | Path | None = None, spec: str = "", overwrite: bool = False) -> dict:
    """Analyse FFN neurons on named domains and (optionally) write the report directory.

    Returns the report dict (see the module docstring for its schema).

    Example:
        >>> model, tok = bricks.load_model("default")
        >>> report = bricks.analyze(model, tok, ["code=builtin:code", "math=builtin:math"], out="runs/analysis")
    """
    cfg = config or AnalyzeConfig()
    if out is not None:
        check_output(out, overwrite)
    torch.manual_seed(cfg.seed)
    train = load_domains(data, tokenizer, "train", cfg.seq_len, cfg.windows)
    validation = load_domains(data, tokenizer, "validation", cfg.seq_len, cfg.eval_windows)
    heldout = load_domains(data, tokenizer, "heldout", cfg.seq_len, cfg.eval_windows)
    names = [d.name for d in train]
    timeline = Timeline("analyze")

    # 1. Sparsity: per-layer thresholds at one shared CETT, searched for +p% perplexity.
    per_domain = max(1, -(-cfg.calib_tokens // cfg.seq_len) // len(train))
    calib_ids = torch.cat([d.windows[:per_domain] for d in train])
    calib = activation_sample(model, calib_ids, cfg.calib_tokens, cfg.batch_size)
    dense_per_domain = [perplexity(model, d.windows, cfg.batch_size) for d in progress(heldout, "dense perplexity")]
    # Perplexity of all held-out windows together, from the per-domain ones (no second dense pass).
    n_pred = [len(d.windows) * (cfg.seq_len - 1) for d in heldout]
    ppl_mixed = math.exp(sum(n * math.log(p) for n, p in zip(n_pred, dense_per_domain)) / sum(n_pred))
    # The CETT is tuned on the validation split; what it does is then measured on the held-out split.
    cett, curves = cett_ppl_search(model, calib, torch.cat([d.windows for d in validation]), cfg.ppl_increase,
                                   batch_size=cfg.batch_size)
    del calib
    timeline.done(f"CETT-PPL-{cfg.ppl_increase:g}% searched on validation: CETT {cett.cett:.3f}")
    down_norms = [b.down_weight().detach().float().norm(dim=0) for b in ffns(model)]
    ppl_sparse, ratio = thresholded_perplexity(model, torch.cat([d.windows for d in heldout]), torch.tensor(cett.eps),
                                               down_norms, cfg.batch_size)

    timeline.done(f"held-out perplexity at those thresholds: +{100 * (ppl_sparse / ppl_mixed - 1):.2f}%")

    # 2. Neuron statistics on the train windows, "active" meaning above the CETT threshold.
    stats = capture_stats(model, train, cfg.batch_size, torch.tensor(cett.eps),
                          coactivation=True, coactivation_stride=cfg.coactivation_stride)
    timeline.done(f"neuron statistics over {int(stats.n_tokens):,} train tokens")

    report: dict = {
        "schema": "bricks.analysis",
        "version": 1,
        "model": {**{k: v for k, v in model_info(model).items() if k in ("model_type", "layers", "hidden_size", "d_ff")},
                  "fingerprint": model_fingerprint(model), "spec": spec},
        "data": {"domains": [{"name": t.name, "source": t.source, "train_windows": len(t.windows),
                              "validation_windows": len(v.windows), "heldout_windows": len(h.windows)}
                             for t, v, h in zip(train, validation, heldout)],
                 "seq_len": cfg.seq_len, "train_tokens": int(stats.n_tokens)},
        "config": cfg.model_dump(),
    }
    grid = torch.linspace(0, min(float(c.cett[-1]) for c in curves), 25)
    report["sparsity"] = {
        "definition": "CETT-PPL-p%",
        "p": cfg.ppl_increase,
        "cett": cett.cett,
        "validation": {"ppl_dense": cett.ppl_dense, "ppl_sparse": cett.ppl_sparse, "increase": cett.achieved_increase},
        "ppl_dense": ppl_mixed,
        "ppl_sparse": ppl_sparse,
        "achieved_increase": ppl_sparse / ppl_mixed - 1,
        "activation_ratio": ratio,
        "mean_activation_ratio": sum(ratio) / len(ratio),
        "sparsity": 1 - sum(ratio) / len(ratio),
        "threshold": cett.eps,
        "activation_frequency_mean": stats.activation_frequency().mean(1).tolist(),
        "search": cett.search,
        "curve": {"cett": grid.tolist(),
                  "mean_activation_ratio": [sum(c.ratio_at(c.eps_for(float(g))) for c in curves) / len(curves) for g in grid]},
    }

    # 3. Functional specialization and its validation by ablation.
    scores = None
    if len(train) > 1:
        scores = func_scores(stats.sample_mean, stats.sample_domain, len(names))
        report["specialization"] = {"threshold": cfg.specialization_threshold,
                                    "per_domain": specialization_summary(scores, names, cfg.specialization_threshold)}
        abl = ablation_matrix(model, scores, [d.windows for d in heldout], names, cfg.ablate_fraction,
                              cfg.batch_size, baseline=dense_per_domain)
        rc = abl["relative_change"]
        others = lambda k: [rc[k][j] for j in range(len(names)) if j != k]  # noqa: E731
        # Zeroing a domain's top neurons hurts that domain more than any other domain.
        abl["diagonal_dominates"] = all(rc[k][k] > max(others(k)) for k in range(len(names)))
        # How much more, at worst: own-domain change over the largest other-domain change.
        abl["min_diagonal_margin"] = min(rc[k][k] / max(max(others(k)), 1e-9) for k in range(len(names)))
        # The other direction: on each domain's text, zeroing its own neurons costs more than zeroing any other's.
        column = lambda k: [rc[j][k] for j in range(len(names)) if j != k]  # noqa: E731
        abl["column_diagonal_dominates"] = all(rc[k][k] > max(column(k)) for k in range(len(names)))
        abl["min_column_margin"] = min(rc[k][k] / max(max(column(k)), 1e-9) for k in range(len(names)))
        report["ablation"] = abl
        timeline.done("specialization (FuncScore) and its ablation check")
    else:
        report["specialization"] = None
        report["ablation"] = None

    # 4. Co-activation graphs and their modularity.
    per_layer = [graph_modularity(coactivation_graph(stats.coact[i], cfg.graph_k), cfg.seed)
                 for i in progress(range(stats.coact.shape[0]), "co-activation graphs")]
    report["coactivation"] = {"k": cfg.graph_k, "per_layer": per_layer,
                              "mean_modularity": sum(p["modularity"] for p in per_layer) / len(per_layer)}
    timeline.done("co-activation graphs and their modularity")

    if out is not None and world()[0] == 0:
        tensors = {
            "activation_frequency": stats.activation_frequency(),
            "mean_abs": stats.mean_abs(),
            "domain_mean_abs": stats.domain_mean_abs(),
            "cett_eps": torch.tensor(cett.eps),
        }
        if scores is not None:
            tensors["func_score"] = scores
        with atomic_dir(out, overwrite=overwrite) as tmp:
            (tmp / "report.json").write_text(json.dumps(report, indent=1))
            save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(tmp / "neurons.safetensors"),
                      metadata={"domains": json.dumps(names)})
            from .plots import plot_report

            plot_report(report, curves, scores, tmp)
    return report

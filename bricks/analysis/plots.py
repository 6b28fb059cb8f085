"""Pictures of an analysis: sparsity curves, specialization heatmaps, the ablation matrix, modularity."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; works without a display
import matplotlib.pyplot as plt  # noqa: E402


def plot_sparsity(report: dict, path: Path) -> None:
    sp = report["sparsity"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    layers = range(len(sp["activation_ratio"]))
    a.bar(layers, sp["activation_ratio"], color="tab:blue")
    a.set(xlabel="layer", ylabel="activation ratio",
          title=f"CETT-PPL-{sp['p']:g}%: CETT={sp['cett']:.3f}, PPL +{100 * sp['achieved_increase']:.2f}%")
    b.plot(sp["curve"]["mean_activation_ratio"], sp["curve"]["cett"], color="tab:gray", label="calibration curve")
    s = sp["search"]
    b.scatter([x["mean_activation_ratio"] for x in s], [x["cett"] for x in s], c=[100 * x["increase"] for x in s],
              cmap="viridis", label="search (colour: PPL +%)", zorder=3)
    b.set(xlabel="mean activation ratio", ylabel="CETT", title="sparsity curve")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_specialization(report: dict, path: Path) -> None:
    spec = report["specialization"]["per_domain"]
    names = list(spec)
    best = [[spec[d]["best"][i] for d in names] for i in range(len(spec[names[0]]["best"]))]
    share = [[spec[d]["share_above"][i] for d in names] for i in range(len(spec[names[0]]["best"]))]
    fig, axes = plt.subplots(1, 2, figsize=(8, 6))
    for ax, data, title, vmax in ((axes[0], best, "best FuncScore", 1.0), (axes[1], share, "share of neurons > 0.8", None)):
        im = ax.imshow(data, aspect="auto", cmap="magma", vmin=0, vmax=vmax)
        ax.set(xticks=range(len(names)), xticklabels=names, ylabel="layer", title=title)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(report: dict, path: Path) -> None:
    abl = report["ablation"]
    names = abl["domains"]
    m = [[100 * x for x in row] for row in abl["relative_change"]]
    # Colour by log2 of the perplexity ratio: one domain's huge change must not wash out the others.
    colour = [[math.log2(1 + x) for x in row] for row in abl["relative_change"]]
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 1.4 * len(names) + 1.5))
    im = ax.imshow(colour, cmap="Reds", vmin=0)
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:+.1f}%", ha="center", va="center", fontsize=9)
    ax.set(xticks=range(len(names)), xticklabels=names, yticks=range(len(names)), yticklabels=names,
           xlabel="evaluated on", ylabel=f"top {100 * abl['fraction']:g}% neurons of ... zeroed", title="perplexity change")
    fig.colorbar(im, ax=ax, label="log2(PPL ablated / PPL)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_modularity(report: dict, path: Path) -> None:
    per = report["coactivation"]["per_layer"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([p["modularity"] for p in per], marker="o")
    ax.set(xlabel="layer", ylabel="modularity (Louvain)", title="co-activation graph modularity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_report(report: dict, curves, scores, out: Path) -> None:
    out = Path(out)
    plot_sparsity(report, out / "sparsity.png")
    plot_modularity(report, out / "modularity.png")
    if report.get("specialization"):
        plot_specialization(report, out / "specialization.png")
        plot_ablation(report, out / "ablation.png")

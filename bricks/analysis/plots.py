"""Pictures of an analysis: sparsity curves, specialization heatmaps, the ablation matrix, modularity."""

from __future__ import annotations

import math
from pathlib import Path

# Figures are built without pyplot: no global backend is chosen or changed (a notebook that calls bricks.analyze
# keeps its inline plots), and saving needs no display.
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def plot_sparsity(report: dict, path: Path) -> None:
    sp = report["sparsity"]
    fig = Figure(figsize=(12, 4.4))
    a, b = fig.subplots(1, 2)
    layers = range(len(sp["activation_ratio"]))
    a.bar(layers, sp["activation_ratio"], color="tab:blue")
    a.set(xlabel="layer", ylabel="share of neurons kept (activation ratio)",
          title=f"at CETT-PPL-{sp['p']:g}%: CETT={sp['cett']:.3f}, PPL +{100 * sp['achieved_increase']:.2f}%")
    a.xaxis.set_major_locator(MaxNLocator(integer=True))
    b.plot(sp["curve"]["mean_activation_ratio"], sp["curve"]["cett"], color="tab:gray", label="calibration curve")
    s = sp["search"]
    points = b.scatter([x["mean_activation_ratio"] for x in s], [x["cett"] for x in s], c=[100 * x["increase"] for x in s],
                       cmap="viridis", zorder=3, edgecolors="black", linewidths=0.3, label="thresholds tried")
    fig.colorbar(points, ax=b, label="perplexity increase (%)")
    b.scatter([sp["mean_activation_ratio"]], [sp["cett"]], marker="*", s=260, facecolors="none", edgecolors="tab:red",
              linewidths=1.8, zorder=4, label=f"chosen: PPL +{100 * sp['achieved_increase']:.2f}%")
    b.set(xlabel="mean activation ratio", ylabel="CETT", title="sparsity curve")
    b.legend(loc="best", fontsize=8)
    fig.text(0.01, 0.01, "CETT: relative error of an FFN's output when its neurons below a magnitude threshold are "
             f"dropped; CETT-PPL-{sp['p']:g}% is the largest CETT that raises perplexity by at most {sp['p']:g}%.",
             fontsize=8, color="dimgray")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)


def plot_specialization(report: dict, path: Path, scores=None) -> None:
    """Left: how FuncScores are distributed over all neurons, per domain (the best neuron of every layer is near 1,
    so a per-layer maximum says little); right: per layer, the share of neurons specialized for each domain."""
    spec = report["specialization"]["per_domain"]
    names = list(spec)
    threshold = report["specialization"].get("threshold", 0.8)
    share = [[spec[d]["share_above"][i] for d in names] for i in range(len(spec[names[0]]["best"]))]
    fig = Figure(figsize=(11, 6))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.4, 1]})
    if scores is not None:  # [layers, domains, d_ff]
        bins = [i / 50 for i in range(51)]
        for k, d in enumerate(names):
            left.hist(scores[:, k].flatten().float().numpy(), bins=bins, histtype="step", linewidth=1.6, label=d)
        left.axvline(threshold, color="black", linestyle=":", linewidth=1)
        left.set(yscale="log", xlabel="FuncScore", ylabel="neurons (all layers)", title="FuncScore of every neuron")
        left.legend(title="domain")
    else:
        left.axis("off")
    im = right.imshow(share, aspect="auto", cmap="magma", vmin=0)
    right.set(xticks=range(len(names)), xticklabels=names, ylabel="layer", title=f"share of neurons > {threshold:g}")
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=right)
    fig.text(0.01, 0.01, "FuncScore: how well a neuron's activation separates one domain's text from the others' "
             "(average precision; 0.5 = not at all, 1 = perfectly).", fontsize=8, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)


def plot_ablation(report: dict, path: Path) -> None:
    abl = report["ablation"]
    names = abl["domains"]
    m = [[100 * x for x in row] for row in abl["relative_change"]]
    # Colour by log2 of the perplexity ratio: one domain's huge change must not wash out the others.
    colour = [[math.log2(1 + x) for x in row] for row in abl["relative_change"]]
    fig = Figure(figsize=(1.6 * len(names) + 2, 1.4 * len(names) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(colour, cmap="Reds", vmin=0)
    top = max(max(row) for row in colour) or 1.0
    for i, row in enumerate(m):
        for j, v in enumerate(row):
            dark = colour[i][j] > 0.55 * top  # white text on the dark cells, black on the light ones
            ax.text(j, i, f"{v:+.1f}%", ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set(xticks=range(len(names)), xticklabels=names, yticks=range(len(names)), yticklabels=names,
           xlabel="evaluated on", ylabel=f"top {100 * abl['fraction']:g}% neurons of ... zeroed", title="perplexity change")
    fig.colorbar(im, ax=ax, label="log2(PPL ablated / PPL)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_modularity(report: dict, path: Path) -> None:
    per = report["coactivation"]["per_layer"]
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    ax.plot([p["modularity"] for p in per], marker="o")
    ax.set(xlabel="layer", ylabel="modularity (Louvain)", title="co-activation graph modularity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_report(report: dict, curves, scores, out: Path) -> None:
    out = Path(out)
    plot_sparsity(report, out / "sparsity.png")
    plot_modularity(report, out / "modularity.png")
    if report.get("specialization"):
        plot_specialization(report, out / "specialization.png", scores)
        plot_ablation(report, out / "ablation.png")

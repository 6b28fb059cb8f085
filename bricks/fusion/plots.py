"""Pictures of a fused model's gate: which specialist speaks where."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure  # not pyplot: the caller's backend is left alone


def plot_gate_shares(shares: dict[str, dict[str, float]], path: str | Path) -> None:
    """Heatmap of the mean gate weight (domain x specialist), from `gate_shares`."""
    domains, names = list(shares), list(next(iter(shares.values())))
    grid = [[shares[d][n] for n in names] for d in domains]
    fig = Figure(figsize=(1.6 + 1.1 * len(names), 1.2 + 0.6 * len(domains)))
    ax = fig.subplots()
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="Blues")
    ax.set(xticks=range(len(names)), xticklabels=names, yticks=range(len(domains)), yticklabels=domains,
           xlabel="specialist", ylabel="held-out domain", title="mean gate weight")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@torch.no_grad()
def plot_token_gates(fused, tokenizer, text: str, path: str | Path, max_tokens: int = 48) -> list[tuple[str, list[float]]]:
    """Per-token gate weights over a sample text (one stacked bar per token); returns (token, weights) pairs."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :max_tokens]
    w = fused(ids.to(fused.get_input_embeddings().weight.device)).weights[0].float().cpu()  # [K, T]
    tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
    fig = Figure(figsize=(max(6.0, 0.28 * len(tokens)), 3.2))
    ax = fig.subplots()
    bottom = torch.zeros(len(tokens))
    for k, name in enumerate(fused.names):
        ax.bar(range(len(tokens)), w[k], bottom=bottom, label=name)
        bottom += w[k]
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=7)
    ax.set(ylim=(0, 1), ylabel="gate weight", title="which specialist speaks where (weight of each, per token)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return [(t, w[:, i].tolist()) for i, t in enumerate(tokens)]

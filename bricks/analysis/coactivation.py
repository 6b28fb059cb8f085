"""Co-activation graphs of FFN neurons and their modularity (Emergent Modularity, Zhang et al. 2023).

Nodes are neurons; two neurons are linked by how often they are active on the
same token, normalised by how often each is active (cosine of their binary
activation vectors). Each neuron keeps its strongest `k` links so that the
graph is sparse enough for community detection.
"""

from __future__ import annotations

import networkx as nx
import torch


def coactivation_similarity(counts: torch.Tensor) -> torch.Tensor:
    """Cosine similarity `[d_ff, d_ff]` of binary activation vectors from co-activation counts."""
    diag = counts.diagonal().clamp(min=1)
    sim = counts / torch.sqrt(diag[:, None] * diag[None, :])
    sim.fill_diagonal_(0)
    return sim


def coactivation_graph(counts: torch.Tensor, k: int = 16) -> nx.Graph:
    """Sparse co-activation graph: every neuron linked to its `k` most co-activated neurons."""
    sim = coactivation_similarity(counts)
    w, idx = sim.topk(k, dim=1)
    g = nx.Graph()
    g.add_nodes_from(range(sim.shape[0]))
    for i in range(sim.shape[0]):
        for weight, j in zip(w[i].tolist(), idx[i].tolist()):
            if weight > 0:
                g.add_edge(i, j, weight=weight)
    return g


def graph_modularity(g: nx.Graph, seed: int = 0) -> dict:
    """Louvain communities of the graph and their modularity (0 = no community structure)."""
    if g.number_of_edges() == 0:
        return {"modularity": 0.0, "communities": g.number_of_nodes(), "largest": 1}
    comms = nx.community.louvain_communities(g, weight="weight", seed=seed)
    return {
        "modularity": float(nx.community.modularity(g, comms, weight="weight")),
        "communities": len(comms),
        "largest": max(len(c) for c in comms),
    }

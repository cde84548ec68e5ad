"""Task clusters from update similarity, with the number of clusters chosen automatically.

Clients that start a round from the same adapter and then move in similar directions are learning similar
tasks. Two things make the raw cosine of whole updates a poor measure here:

- ranks differ: a rank-2 and a rank-32 client share only the first 2 components of the adapter they were sent,
  so the rank-32 client's other 30 components are orthogonal noise to the rank-2 one. Each pair is compared on
  its common slice: ΔW_m = B[:, :r]·A[:r] - B₀[:, :r]·A₀[:r] with r the smaller rank, per module m.
- a few modules with large updates would dominate one global cosine, so the per-module cosines are averaged.

Cosines come from the low-rank factors, without forming any (out x in) matrix: ⟨B·A, B'·A'⟩_F = Σ (BᵀB') ⊙ (A·A'ᵀ).

Updates after a few local steps are noisy, so even two clients of one task have a small cosine (about 0.2 on
SmolLM2 after 4 steps), and a fixed threshold on it says little. What is comparable across runs is the cosine
between two clusters relative to the cosine within them: mean S(a, b) / √(S(a, a)·S(b, b)), which is Spearman's
correction for attenuation. It estimates the cosine of the two clusters' noise-free task directions: about 1 for
one task split in two, lower for different tasks. The clusters come from average-linkage agglomeration on
1 - S; the number of clusters is the largest k (up to `max_clusters`) whose every pair of clusters stays below
`max_cross`, else one cluster.
"""

from __future__ import annotations

import numpy as np

from fedlm.federated.lora import LoraPair, LoraState


def _update_factors(pair: LoraPair, start: LoraPair | None) -> tuple[np.ndarray, np.ndarray]:
    """Factors (B, A) with B·A = pair.delta() - start.delta()."""
    if start is None:
        return pair.b.astype(np.float64), pair.a.astype(np.float64)
    b = np.concatenate([pair.b, -start.b], 1).astype(np.float64)
    a = np.concatenate([pair.a, start.a], 0).astype(np.float64)
    return b, a


def _inner(x: tuple[np.ndarray, np.ndarray], y: tuple[np.ndarray, np.ndarray]) -> float:
    return float(np.sum((x[0].T @ y[0]) * (x[1] @ y[1].T)))


def _cosine(x: tuple[np.ndarray, np.ndarray], y: tuple[np.ndarray, np.ndarray]) -> float:
    norm = np.sqrt(_inner(x, x) * _inner(y, y))
    return _inner(x, y) / norm if norm > 0 else 0.0


def update_similarity(states: list[LoraState], starts: list[LoraState]) -> np.ndarray:
    """Mean over shared modules of the cosine of the clients' updates on their common rank slice.

    Client k started the round from starts[k]; a pair that shares no module has similarity 0.
    """
    n = len(states)
    sim = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            cosines = []
            for name in sorted(states[i].keys() & states[j].keys()):
                rank = min(states[i][name].rank, states[j][name].rank)
                x, y = (
                    _update_factors(states[k][name].sliced(rank), _sliced(starts[k].get(name), rank)) for k in (i, j)
                )
                cosines.append(_cosine(x, y))
            sim[i, j] = sim[j, i] = float(np.mean(cosines)) if cosines else 0.0
    return sim


def _sliced(pair: LoraPair | None, rank: int) -> LoraPair | None:
    return None if pair is None else pair.sliced(rank)


def agglomerate(distance: np.ndarray, k: int) -> np.ndarray:
    """Average-linkage agglomerative clustering into k clusters; labels numbered by first member."""
    clusters: list[list[int]] = [[i] for i in range(len(distance))]
    while len(clusters) > k:
        best = (np.inf, 0, 1)
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                link = float(distance[np.ix_(clusters[i], clusters[j])].mean())
                best = min(best, (link, i, j))
        _, i, j = best
        clusters[i] += clusters.pop(j)
    labels = np.empty(len(distance), dtype=int)
    for label, members in enumerate(sorted(clusters, key=min)):
        labels[members] = label
    return labels


def cross_similarity(similarity: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Between-cluster similarity corrected for attenuation: S(a, b) / √(S(a, a)·S(b, b)), a (k x k) matrix.

    S(a, a) is the mean similarity of distinct members of a: how reliable one update is. A lone client has no
    such estimate and borrows the mean of the other clusters'. A cluster whose members do not agree at all
    (S(a, a) ≤ 0), or a split with no cluster of two, cannot be judged: its entries are +inf.
    """
    groups = [np.flatnonzero(labels == label) for label in range(labels.max() + 1)]
    within = [
        float(similarity[np.ix_(g, g)][~np.eye(len(g), dtype=bool)].mean()) if len(g) > 1 else np.nan for g in groups
    ]
    known = [w for w in within if not np.isnan(w)]
    if not known:
        return np.full((len(groups), len(groups)), np.inf)
    within = np.array([np.mean(known) if np.isnan(w) else w for w in within])
    cross = np.ones((len(groups), len(groups)))
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            mean = float(similarity[np.ix_(groups[a], groups[b])].mean())
            reliable = within[a] > 0 and within[b] > 0
            cross[a, b] = cross[b, a] = mean / np.sqrt(within[a] * within[b]) if reliable else np.inf
    return cross


def choose_clusters(similarity: np.ndarray, max_clusters: int = 4, max_cross: float = 0.5) -> np.ndarray:
    """Labels for the largest number of clusters (≤ max_clusters) whose clusters are all told apart."""
    n = len(similarity)
    distance = np.clip(1.0 - similarity, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    for k in range(min(max_clusters, n - 1), 1, -1):
        labels = agglomerate(distance, k)
        cross = cross_similarity(similarity, labels)
        if cross[~np.eye(k, dtype=bool)].max() < max_cross:
            return labels
    return np.zeros(n, dtype=int)


def purity(labels: list[int], truth: list[str]) -> float:
    """Share of clients whose cluster's majority task is their own task."""
    hits = 0
    for label in set(labels):
        members = [t for lab, t in zip(labels, truth, strict=True) if lab == label]
        hits += max(members.count(t) for t in set(members))
    return hits / len(labels)

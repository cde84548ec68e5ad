"""Task clusters from update similarity, with the number of clusters chosen automatically.

Clients that start a round from the same adapter and then move in similar directions are learning similar
tasks. The update of client k is D_k = B_k·A_k - B_0·A_0 (per module); cosine similarity between updates is
computed from the low-rank factors, without forming any (out x in) matrix:
⟨B·A, B'·A'⟩_F = Σ (BᵀB') ⊙ (A·A'ᵀ). Clustering is average-linkage agglomeration on 1 - cosine; the number of
clusters is the one with the best silhouette, and one cluster when no split reaches `min_silhouette`.
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


def update_similarity(states: list[LoraState], starts: list[LoraState]) -> np.ndarray:
    """Cosine similarity matrix of the clients' updates; client k started the round from starts[k]."""
    factors = [
        {name: _update_factors(pair, start.get(name)) for name, pair in state.items()}
        for state, start in zip(states, starts, strict=True)
    ]
    n = len(states)
    gram = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            shared = factors[i].keys() & factors[j].keys()
            gram[i, j] = gram[j, i] = sum(_inner(factors[i][m], factors[j][m]) for m in shared)
    norms = np.sqrt(np.clip(np.diag(gram), 1e-30, None))
    return gram / np.outer(norms, norms)


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


def silhouette(distance: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (Rousseeuw 1987); a member alone in its cluster scores 0."""
    scores = []
    for i, label in enumerate(labels):
        same = (labels == label) & (np.arange(len(labels)) != i)
        if not same.any():
            scores.append(0.0)
            continue
        a = distance[i, same].mean()
        b = min(distance[i, labels == other].mean() for other in set(labels.tolist()) - {label})
        scores.append((b - a) / max(a, b) if max(a, b) > 0 else 0.0)
    return float(np.mean(scores))


def choose_clusters(similarity: np.ndarray, max_clusters: int = 4, min_silhouette: float = 0.2) -> np.ndarray:
    """Labels for the number of clusters (1..max_clusters) whose split is best separated."""
    n = len(similarity)
    distance = np.clip(1.0 - similarity, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    best_labels, best_score = np.zeros(n, dtype=int), min_silhouette
    for k in range(2, min(max_clusters, n - 1) + 1):
        labels = agglomerate(distance, k)
        score = silhouette(distance, labels)
        if score > best_score:
            best_labels, best_score = labels, score
    return best_labels


def purity(labels: list[int], truth: list[str]) -> float:
    """Share of clients whose cluster's majority task is their own task."""
    hits = 0
    for label in set(labels):
        members = [t for lab, t in zip(labels, truth, strict=True) if lab == label]
        hits += max(members.count(t) for t in set(members))
    return hits / len(labels)

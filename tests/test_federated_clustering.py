"""Update similarity from low-rank factors, automatic number of clusters, purity."""

import numpy as np

from fedlm.federated.clustering import agglomerate, choose_clusters, purity, silhouette, update_similarity
from fedlm.federated.lora import LoraPair


def test_similarity_from_factors_matches_dense_cosine():
    rng = np.random.default_rng(1)
    start = {"m": LoraPair(rng.normal(size=(2, 5)), rng.normal(size=(4, 2)))}
    states = [{"m": LoraPair(rng.normal(size=(2, 5)), rng.normal(size=(4, 2)))} for _ in range(3)]
    sim = update_similarity(states, [start] * 3)
    dense = [(s["m"].delta() - start["m"].delta()).ravel() for s in states]
    for i in range(3):
        for j in range(3):
            cos = dense[i] @ dense[j] / np.linalg.norm(dense[i]) / np.linalg.norm(dense[j])
            assert abs(sim[i, j] - cos) < 1e-9


def test_similarity_of_parallel_and_orthogonal_updates():
    zero = {"m": LoraPair(np.zeros((1, 2)), np.zeros((2, 1)))}
    x = {"m": LoraPair(np.array([[1.0, 0.0]]), np.array([[1.0], [0.0]]))}
    x2 = {"m": LoraPair(np.array([[2.0, 0.0]]), np.array([[3.0], [0.0]]))}
    y = {"m": LoraPair(np.array([[0.0, 1.0]]), np.array([[0.0], [1.0]]))}
    sim = update_similarity([x, x2, y], [zero] * 3)
    np.testing.assert_allclose(sim, [[1, 1, 0], [1, 1, 0], [0, 0, 1]], atol=1e-12)


TWO_BLOCKS = np.array(
    [
        [1.0, 0.8, 0.7, 0.1, 0.0],
        [0.8, 1.0, 0.9, 0.0, 0.1],
        [0.7, 0.9, 1.0, 0.1, 0.0],
        [0.1, 0.0, 0.1, 1.0, 0.8],
        [0.0, 0.1, 0.0, 0.8, 1.0],
    ]
)


def test_agglomerate_and_silhouette_by_hand():
    distance = 1 - TWO_BLOCKS
    labels = agglomerate(distance, 2)
    assert labels.tolist() == [0, 0, 0, 1, 1]
    # (b - a) / b per client: a = mean distance within its cluster, b = mean distance to the other cluster.
    by_hand = [0.7 / 0.95, 0.8 / 0.95, 0.75 / 0.95, (2.8 / 3 - 0.2) / (2.8 / 3), (2.9 / 3 - 0.2) / (2.9 / 3)]
    assert abs(silhouette(distance, labels) - np.mean(by_hand)) < 1e-12


def test_number_of_clusters_is_chosen_automatically():
    assert choose_clusters(TWO_BLOCKS).tolist() == [0, 0, 0, 1, 1]
    uniform = np.full((5, 5), 0.5) + 0.5 * np.eye(5)
    assert choose_clusters(uniform).tolist() == [0, 0, 0, 0, 0]


def test_purity():
    assert purity([0, 0, 1, 1], ["a", "a", "b", "b"]) == 1.0
    assert purity([0, 0, 0, 0], ["a", "a", "b", "b"]) == 0.5
    assert purity([0, 0, 0, 1], ["a", "b", "a", "b"]) == 0.75

"""Update similarity from low-rank factors, automatic number of clusters, purity."""

import numpy as np

from fedlm.federated.clustering import agglomerate, choose_clusters, cross_similarity, purity, update_similarity
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


def test_ranks_are_compared_on_their_common_slice():
    # Both clients move the first component the same way; the rank-3 one also moves two more components. On
    # the common slice (rank 1) the updates are parallel, whatever the extra components do.
    rng = np.random.default_rng(2)
    start = LoraPair(rng.normal(size=(3, 6)), np.zeros((4, 3)))
    b = np.zeros((4, 3))
    b[:, 0] = [1.0, 2.0, 0.0, -1.0]
    b[:, 1:] = rng.normal(size=(4, 2)) * 10
    high = LoraPair(start.a, b)
    low = LoraPair(start.a[:1], b[:, :1] * 0.5)
    sim = update_similarity([{"m": low}, {"m": high}], [{"m": start.sliced(1)}, {"m": start}])
    assert abs(sim[0, 1] - 1.0) < 1e-9


def test_each_module_counts_equally():
    # Module "big" agrees (cosine 1) with a large update, module "small" disagrees (cosine -1): the mean is 0.
    zero = LoraPair(np.zeros((1, 2)), np.zeros((2, 1)))
    big = LoraPair(np.array([[100.0, 0.0]]), np.array([[1.0], [0.0]]))
    small = LoraPair(np.array([[0.0, 1.0]]), np.array([[0.0], [1.0]]))
    x = {"big": big, "small": small}
    y = {"big": big, "small": LoraPair(small.a, -small.b)}
    sim = update_similarity([x, y], [{"big": zero, "small": zero}] * 2)
    assert abs(sim[0, 1]) < 1e-12


TWO_BLOCKS = np.array(
    [
        [1.0, 0.8, 0.7, 0.1, 0.0],
        [0.8, 1.0, 0.9, 0.0, 0.1],
        [0.7, 0.9, 1.0, 0.1, 0.0],
        [0.1, 0.0, 0.1, 1.0, 0.8],
        [0.0, 0.1, 0.0, 0.8, 1.0],
    ]
)
# Measured on SmolLM2 after one round of 4 local steps (ranks 2, 8, 32, 2): two tasks, interleaved, whose
# within-task cosines are only about 0.2.
SMOLLM2_MIX = np.array(
    [
        [1.0, 0.023, 0.197, 0.057],
        [0.023, 1.0, 0.032, 0.24],
        [0.197, 0.032, 1.0, 0.068],
        [0.057, 0.24, 0.068, 1.0],
    ]
)
# Measured the same way on four Shakespeare roles: one task, and the fourth role a little apart.
SMOLLM2_ONE_TASK = np.array(
    [
        [1.0, 0.25, 0.224, 0.19],
        [0.25, 1.0, 0.238, 0.173],
        [0.224, 0.238, 1.0, 0.16],
        [0.19, 0.173, 0.16, 1.0],
    ]
)


def test_agglomerate_by_hand():
    assert agglomerate(1 - TWO_BLOCKS, 2).tolist() == [0, 0, 0, 1, 1]
    # Closest pair (1, 3) merges first, then (0, 2); cutting at 3 leaves 0 and 2 alone.
    assert agglomerate(1 - SMOLLM2_MIX, 3).tolist() == [0, 1, 2, 1]


def test_cross_similarity_is_corrected_for_attenuation_by_hand():
    cross = cross_similarity(SMOLLM2_MIX, np.array([0, 1, 0, 1]))
    between = (0.023 + 0.057 + 0.032 + 0.068) / 4
    assert abs(cross[0, 1] - between / np.sqrt(0.197 * 0.24)) < 1e-12
    # A lone client borrows the other clusters' within-similarity: 0.197 / √(0.24 · 0.24).
    cross = cross_similarity(SMOLLM2_MIX, np.array([0, 1, 2, 1]))
    assert abs(cross[0, 2] - 0.197 / 0.24) < 1e-12


def test_split_that_cannot_be_judged_is_refused():
    assert np.isinf(cross_similarity(SMOLLM2_MIX, np.array([0, 1, 2, 3]))[0, 1])  # nobody has a partner
    disagree = np.array([[1.0, -0.1, 0.0], [-0.1, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert np.isinf(cross_similarity(disagree, np.array([0, 0, 1]))[0, 1])


def test_number_of_clusters_is_chosen_automatically():
    assert choose_clusters(TWO_BLOCKS).tolist() == [0, 0, 0, 1, 1]
    assert choose_clusters(SMOLLM2_MIX).tolist() == [0, 1, 0, 1]
    assert choose_clusters(SMOLLM2_ONE_TASK).tolist() == [0, 0, 0, 0]
    uniform = np.full((5, 5), 0.5) + 0.5 * np.eye(5)
    assert choose_clusters(uniform).tolist() == [0, 0, 0, 0, 0]


def test_three_tasks_and_a_lone_client():
    rng = np.random.default_rng(3)
    truth = np.array([0, 0, 1, 1, 2, 2, 2])
    sim = np.where(truth[:, None] == truth[None], 0.25, 0.03) + rng.normal(0, 0.02, (7, 7))
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    assert choose_clusters(sim).tolist() == truth.tolist()
    lone = np.array([0, 0, 0, 1])  # one client of another task: judged against the others' agreement
    sim = np.where(lone[:, None] == lone[None], 0.2, 0.02)
    np.fill_diagonal(sim, 1.0)
    assert choose_clusters(sim).tolist() == lone.tolist()


def test_purity():
    assert purity([0, 0, 1, 1], ["a", "a", "b", "b"]) == 1.0
    assert purity([0, 0, 0, 0], ["a", "a", "b", "b"]) == 0.5
    assert purity([0, 0, 0, 1], ["a", "b", "a", "b"]) == 0.75

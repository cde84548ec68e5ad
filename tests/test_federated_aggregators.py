"""Aggregator math on small hand-worked tensors."""

import numpy as np
import pytest

from fedlm.federated.aggregators import ClientUpdate, FedAvg, FlexLoRA, HetLoRA, ZeroPad, make_aggregator
from fedlm.federated.lora import LoraPair


def pair(a, b) -> LoraPair:
    return LoraPair(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))


def test_fedavg_weights_a_and_b_by_examples():
    x = pair([[1.0, 0.0]], [[2.0], [0.0]])
    y = pair([[0.0, 1.0]], [[0.0], [4.0]])
    out = FedAvg().aggregate([ClientUpdate({"m": x}, 1), ClientUpdate({"m": y}, 3)])["m"]
    np.testing.assert_allclose(out.a, [[0.25, 0.75]])
    np.testing.assert_allclose(out.b, [[0.5], [3.0]])


def test_fedavg_refuses_mixed_ranks():
    with pytest.raises(ValueError, match="equal LoRA ranks"):
        FedAvg().aggregate(
            [ClientUpdate({"m": pair([[1, 0]], [[1], [0]])}, 1), ClientUpdate({"m": pair(np.eye(2), np.eye(2))}, 1)]
        )


def test_zeropad_pads_low_rank_with_zeros_before_averaging():
    low = pair([[2.0, 2.0]], [[2.0], [2.0]])  # rank 1
    high = pair([[0.0, 0.0], [4.0, 4.0]], [[0.0, 6.0], [0.0, 6.0]])  # rank 2
    out = ZeroPad().aggregate([ClientUpdate({"m": low}, 1), ClientUpdate({"m": high}, 1)])["m"]
    np.testing.assert_allclose(out.a, [[1.0, 1.0], [2.0, 2.0]])
    np.testing.assert_allclose(out.b, [[1.0, 3.0], [1.0, 3.0]])


def test_hetlora_weights_by_update_norm():
    # ΔW norms: x -> ||[[3]]|| = 3, y -> ||[[1]]|| = 1, so weights 3/4 and 1/4 whatever the example counts.
    x = pair([[1.0]], [[3.0]])
    y = pair([[1.0]], [[1.0]])
    out = HetLoRA().aggregate([ClientUpdate({"m": x}, 100), ClientUpdate({"m": y}, 1)])["m"]
    np.testing.assert_allclose(out.b, [[0.75 * 3 + 0.25 * 1]])
    np.testing.assert_allclose(out.a, [[1.0]])


def test_flexlora_averages_full_updates_then_svd():
    # Two rank-1 updates along different axes: ΔW_avg = diag(3, 1) (weights 1/2 each of diag(6,0), diag(0,2)).
    x = pair([[1.0, 0.0]], [[6.0], [0.0]])
    y = pair([[0.0, 1.0]], [[0.0], [2.0]])
    out = FlexLoRA().aggregate([ClientUpdate({"m": x}, 1), ClientUpdate({"m": y}, 1)])["m"]
    assert out.rank == 1
    # Best rank-1 approximation of diag(3, 1) keeps the larger singular value: diag(3, 0).
    np.testing.assert_allclose(out.delta(), [[3.0, 0.0], [0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(np.abs(out.a), [[np.sqrt(3), 0.0]], atol=1e-6)


def test_flexlora_slices_are_best_low_rank_approximations():
    rng = np.random.default_rng(0)
    updates = [
        ClientUpdate(
            {"m": LoraPair(rng.normal(size=(r, 6)).astype(np.float32), rng.normal(size=(5, r)).astype(np.float32))}, n
        )
        for r, n in ((1, 2), (2, 1), (4, 3))
    ]
    out = FlexLoRA().aggregate(updates)["m"]
    full = sum(w * u.state["m"].delta() for w, u in zip(np.array([2, 1, 3]) / 6, updates, strict=True))
    u, s, vt = np.linalg.svd(full)
    np.testing.assert_allclose(out.delta(), (u[:, :4] * s[:4]) @ vt[:4], atol=1e-4)
    np.testing.assert_allclose(out.sliced(2).delta(), (u[:, :2] * s[:2]) @ vt[:2], atol=1e-4)


def test_modules_are_aggregated_over_the_clients_that_adapt_them():
    qv = {"q": pair([[1.0]], [[1.0]])}
    qkv = {"q": pair([[3.0]], [[3.0]]), "k": pair([[5.0]], [[5.0]])}
    out = ZeroPad().aggregate([ClientUpdate(qv, 1), ClientUpdate(qkv, 1)])
    np.testing.assert_allclose(out["q"].a, [[2.0]])
    np.testing.assert_allclose(out["k"].a, [[5.0]])


def test_unknown_aggregator_is_named():
    with pytest.raises(ValueError, match="fedavg, zeropad, hetlora, flexlora"):
        make_aggregator("nope")

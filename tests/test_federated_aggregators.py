"""Aggregator math on small hand-worked tensors."""

import numpy as np
import pytest

from fedlm.federated.aggregators import ClientUpdate, FedAvg, FlexLoRA, HetLoRA, ZeroPad, make_aggregator
from fedlm.federated.lora import LoraPair


def pair(a, b) -> LoraPair:
    return LoraPair(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32))


def zeros(rank: int, n_in: int, n_out: int) -> LoraPair:
    return LoraPair(np.zeros((rank, n_in), np.float32), np.zeros((n_out, rank), np.float32))


def from_zero(trained: dict[str, LoraPair], n: int) -> ClientUpdate:
    """A client that started from an all-zero slice at its own rank: its update is its adapter."""
    start = {name: zeros(p.rank, p.a.shape[1], p.b.shape[0]) for name, p in trained.items()}
    return ClientUpdate(trained, start, n)


def test_fedavg_weights_a_and_b_by_examples():
    x = pair([[1.0, 0.0]], [[2.0], [0.0]])
    y = pair([[0.0, 1.0]], [[0.0], [4.0]])
    out = FedAvg().aggregate({"m": zeros(1, 2, 2)}, [from_zero({"m": x}, 1), from_zero({"m": y}, 3)])["m"]
    np.testing.assert_allclose(out.a, [[0.25, 0.75]])
    np.testing.assert_allclose(out.b, [[0.5], [3.0]])


def test_fedavg_of_updates_equals_fedavg_of_adapters_from_one_start():
    rng = np.random.default_rng(4)
    start = LoraPair(rng.normal(size=(2, 3)), rng.normal(size=(4, 2)))
    trained = [LoraPair(rng.normal(size=(2, 3)), rng.normal(size=(4, 2))) for _ in range(2)]
    out = FedAvg().aggregate(
        {"m": start}, [ClientUpdate({"m": t}, {"m": start}, n) for t, n in zip(trained, (1, 3), strict=True)]
    )
    np.testing.assert_allclose(out["m"].a, 0.25 * trained[0].a + 0.75 * trained[1].a, atol=1e-6)
    np.testing.assert_allclose(out["m"].b, 0.25 * trained[0].b + 0.75 * trained[1].b, atol=1e-6)


def test_fedavg_refuses_mixed_ranks():
    with pytest.raises(ValueError, match="equal LoRA ranks"):
        FedAvg().aggregate(
            {"m": zeros(2, 2, 2)},
            [from_zero({"m": pair([[1, 0]], [[1], [0]])}, 1), from_zero({"m": pair(np.eye(2), np.eye(2))}, 1)],
        )


def test_zeropad_pads_low_rank_with_zeros_before_averaging():
    low = pair([[2.0, 2.0]], [[2.0], [2.0]])  # rank 1
    high = pair([[0.0, 0.0], [4.0, 4.0]], [[0.0, 6.0], [0.0, 6.0]])  # rank 2
    out = ZeroPad().aggregate({"m": zeros(2, 2, 2)}, [from_zero({"m": low}, 1), from_zero({"m": high}, 1)])["m"]
    np.testing.assert_allclose(out.a, [[1.0, 1.0], [2.0, 2.0]])
    np.testing.assert_allclose(out.b, [[1.0, 3.0], [1.0, 3.0]])


def test_components_a_low_rank_client_never_held_are_not_shrunk():
    # The global has two components; the rank-1 client gets the first and leaves it unchanged, the rank-2 client
    # moves nothing. Averaging adapters would halve the second component; averaging updates keeps it.
    current = pair([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 5.0]])
    low = ClientUpdate({"m": current.sliced(1)}, {"m": current.sliced(1)}, 1)
    high = ClientUpdate({"m": current}, {"m": current}, 1)
    for aggregator in (ZeroPad(), HetLoRA(), FlexLoRA()):
        out = aggregator.aggregate({"m": current}, [low, high])["m"]
        np.testing.assert_allclose(out.delta(), current.delta(), atol=1e-6)


def test_hetlora_weights_by_adapter_norm():
    # ΔW norms: x -> ||[[3]]|| = 3, y -> ||[[1]]|| = 1, so weights 3/4 and 1/4 whatever the example counts.
    x = pair([[1.0]], [[3.0]])
    y = pair([[1.0]], [[1.0]])
    out = HetLoRA().aggregate({"m": zeros(1, 1, 1)}, [from_zero({"m": x}, 100), from_zero({"m": y}, 1)])["m"]
    np.testing.assert_allclose(out.b, [[0.75 * 3 + 0.25 * 1]])
    np.testing.assert_allclose(out.a, [[1.0]])


def test_flexlora_averages_full_updates_then_svd():
    # Two rank-1 updates along different axes: ΔW_avg = diag(3, 1) (weights 1/2 each of diag(6,0), diag(0,2)).
    x = pair([[1.0, 0.0]], [[6.0], [0.0]])
    y = pair([[0.0, 1.0]], [[0.0], [2.0]])
    out = FlexLoRA().aggregate({"m": zeros(1, 2, 2)}, [from_zero({"m": x}, 1), from_zero({"m": y}, 1)])["m"]
    assert out.rank == 1
    # Best rank-1 approximation of diag(3, 1) keeps the larger singular value: diag(3, 0).
    np.testing.assert_allclose(out.delta(), [[3.0, 0.0], [0.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(np.abs(out.a), [[np.sqrt(3), 0.0]], atol=1e-6)


def test_flexlora_moves_the_global_by_the_mean_update_then_svd():
    rng = np.random.default_rng(0)
    current = LoraPair(rng.normal(size=(4, 6)), rng.normal(size=(5, 4)))
    updates = []
    for r, n in ((1, 2), (2, 1), (4, 3)):
        trained = LoraPair(rng.normal(size=(r, 6)).astype(np.float32), rng.normal(size=(5, r)).astype(np.float32))
        updates.append(ClientUpdate({"m": trained}, {"m": current.sliced(r)}, n))
    out = FlexLoRA().aggregate({"m": current}, updates)["m"]
    full = current.delta() + sum(
        w * (u.state["m"].delta() - u.start["m"].delta()) for w, u in zip(np.array([2, 1, 3]) / 6, updates, strict=True)
    )
    u, s, vt = np.linalg.svd(full)
    np.testing.assert_allclose(out.delta(), (u[:, :4] * s[:4]) @ vt[:4], atol=1e-4)
    np.testing.assert_allclose(out.sliced(2).delta(), (u[:, :2] * s[:2]) @ vt[:2], atol=1e-4)


def test_a_client_that_does_not_adapt_a_module_takes_a_zero_step_there():
    qv = {"q": pair([[1.0]], [[1.0]])}
    qkv = {"q": pair([[3.0]], [[3.0]]), "k": pair([[5.0]], [[5.0]])}
    current = {"q": zeros(1, 1, 1), "k": zeros(1, 1, 1), "o": pair([[7.0]], [[7.0]])}
    out = ZeroPad().aggregate(current, [from_zero(qv, 1), from_zero(qkv, 1)])
    np.testing.assert_allclose(out["q"].a, [[2.0]])
    np.testing.assert_allclose(out["k"].a, [[2.5]])  # (5 + 0) / 2
    np.testing.assert_allclose(out["o"].a, [[7.0]])  # nobody adapts it: kept
    flex = FlexLoRA().aggregate(current, [from_zero(qv, 1), from_zero(qkv, 1)])
    np.testing.assert_allclose(flex["k"].delta(), [[12.5]], atol=1e-5)  # ΔW (25 + 0) / 2
    het = HetLoRA().aggregate(current, [from_zero(qv, 1), from_zero(qkv, 1)])
    np.testing.assert_allclose(het["k"].a, [[5.0]])  # weight by ‖ΔW‖: a client without the module weighs 0


def test_unknown_aggregator_is_named():
    with pytest.raises(ValueError, match="fedavg, zeropad, hetlora, flexlora"):
        make_aggregator("nope")

"""Fusion rules on small hand-made distributions."""

import math

import pytest
import torch

from fedlm.fusion.rules import EdgeOnly, Experts, LogLinear, ProxyTuning, Router, TokenRouting, entropy, make_rule
from fedlm.fusion.vocab import Projection


def _dist(*probs: float) -> torch.Tensor:
    return torch.tensor(probs).log()


def _cloud(*probs: float, entropy_nats: float | None = None) -> Projection:
    lp = _dist(*probs)
    return Projection(lp, 1.0, entropy(lp) if entropy_nats is None else entropy_nats)


EDGE = _dist(0.7, 0.2, 0.1)
CLOUD = _cloud(0.1, 0.8, 0.1)


def test_log_linear_interpolates_in_log_space() -> None:
    assert torch.allclose(LogLinear(0.0).fuse(Experts(EDGE, CLOUD)), EDGE)
    assert torch.allclose(LogLinear(1.0).fuse(Experts(EDGE, CLOUD)), CLOUD.logprobs)
    half = LogLinear(0.5).fuse(Experts(EDGE, CLOUD)).exp()
    expected = torch.tensor([math.sqrt(0.07), math.sqrt(0.16), math.sqrt(0.01)])
    assert torch.allclose(half, expected / expected.sum(), atol=1e-6)


def test_without_cloud_every_rule_is_the_edge() -> None:
    for name in ("none", "linear", "router", "proxy", "route"):
        assert torch.allclose(make_rule(name).fuse(Experts(EDGE)), EDGE)
    with pytest.raises(ValueError, match="router"):
        make_rule("magic")


def test_router_weights_follow_confidence() -> None:
    confident_cloud = _cloud(0.01, 0.98, 0.01)
    weights = Router().mixture_weights(Experts(EDGE, confident_cloud))
    assert weights["cloud"] > weights["edge"] and abs(sum(weights.values()) - 1) < 1e-9
    h_edge, h_cloud = entropy(EDGE), confident_cloud.entropy
    assert weights["cloud"] / weights["edge"] == pytest.approx(math.exp(h_edge - h_cloud))
    mixed = Router().fuse(Experts(EDGE, confident_cloud)).exp()
    expected = weights["edge"] * EDGE.exp() + weights["cloud"] * confident_cloud.logprobs.exp()
    assert torch.allclose(mixed, expected, atol=1e-6)


def test_router_takes_the_adapted_edge_as_a_third_expert() -> None:
    adapted = _dist(0.05, 0.05, 0.9)
    experts = Experts(EDGE, CLOUD, adapted)
    weights = Router().mixture_weights(experts)
    confidence = {
        "edge": math.exp(-entropy(EDGE)),
        "adapted": math.exp(-entropy(adapted)),
        "cloud": math.exp(-CLOUD.entropy),
    }
    total = sum(confidence.values())
    assert weights == pytest.approx({name: c / total for name, c in confidence.items()})
    expected = (
        weights["edge"] * EDGE.exp() + weights["adapted"] * adapted.exp() + weights["cloud"] * CLOUD.logprobs.exp()
    )
    assert torch.allclose(Router().fuse(experts).exp(), expected, atol=1e-6)


def test_proxy_tuning_shifts_the_cloud_by_the_adapter() -> None:
    adapted = _dist(0.35, 0.1, 0.55)  # the adapter halves tokens 0 and 1 relative to the base, boosts token 2
    fused = ProxyTuning().fuse(Experts(EDGE, CLOUD, adapted)).exp()
    raw = CLOUD.logprobs.exp() * adapted.exp() / EDGE.exp()
    assert torch.allclose(fused, raw / raw.sum(), atol=1e-6)
    assert torch.allclose(ProxyTuning().fuse(Experts(EDGE, CLOUD)), CLOUD.logprobs)


def test_token_routing_asks_the_cloud_only_when_the_edge_is_unsure() -> None:
    rule = TokenRouting(threshold=0.5)
    assert not rule.wants_cloud(EDGE)  # 0.7 >= 0.5
    assert torch.allclose(rule.fuse(Experts(EDGE, CLOUD)), EDGE)
    unsure = _dist(0.4, 0.35, 0.25)
    assert rule.wants_cloud(unsure)
    assert torch.allclose(rule.fuse(Experts(unsure, CLOUD)), CLOUD.logprobs)
    assert torch.allclose(EdgeOnly().fuse(Experts(unsure, CLOUD)), unsure)


# The cloud disagrees with the edge (token 1 against token 0) and the edge is unsure enough for `route` to ask.
UNSURE = _dist(0.45, 0.35, 0.2)


def _by_hand(name: str) -> torch.Tensor:
    """Each rule's fused distribution on (UNSURE, CLOUD), computed from its definition, as probabilities."""
    edge, cloud = UNSURE.exp(), CLOUD.logprobs.exp()
    if name == "linear":
        raw = edge.sqrt() * cloud.sqrt()
        return raw / raw.sum()
    if name == "router":
        w_edge, w_cloud = math.exp(-entropy(UNSURE)), math.exp(-CLOUD.entropy)
        return (w_edge * edge + w_cloud * cloud) / (w_edge + w_cloud)
    return cloud  # proxy without an adapter, and route where the edge is unsure: the cloud itself


@pytest.mark.parametrize("name", ["linear", "router", "proxy", "route"])
def test_every_fusing_rule_listens_to_a_disagreeing_cloud(name: str) -> None:
    rule = make_rule(name)
    assert rule.uses_cloud and rule.wants_cloud(UNSURE)
    fused = rule.fuse(Experts(UNSURE, CLOUD))
    assert not torch.allclose(fused, UNSURE, atol=1e-3), f"{name} ignored the cloud"
    assert torch.allclose(fused.exp(), _by_hand(name), atol=1e-6)
    assert float(fused.logsumexp(-1)) == pytest.approx(0.0, abs=1e-6)
    assert int(UNSURE.argmax()) == 0 and int(fused.argmax()) == 1  # the cloud's token wins: it overturns the edge


def test_edge_only_never_asks_the_cloud_and_ignores_its_answer() -> None:
    rule = make_rule("none")
    assert not rule.uses_cloud and not rule.wants_cloud(UNSURE)
    assert torch.equal(rule.fuse(Experts(UNSURE, CLOUD)), UNSURE)
    adapted = _dist(0.1, 0.1, 0.8)
    assert torch.equal(rule.fuse(Experts(UNSURE, CLOUD, adapted)), adapted)  # the device's own best belief


def test_rules_that_fuse_everywhere_want_the_cloud_everywhere() -> None:
    for name in ("linear", "router", "proxy"):
        assert make_rule(name).wants_cloud(EDGE) and make_rule(name).wants_cloud(UNSURE)
    assert not make_rule("route").wants_cloud(EDGE) and make_rule("route").wants_cloud(UNSURE)

"""The one fuse step: what is projected against what, and what the rule sees."""

import math

import torch

from fedlm.cloud.logprobs import CloudCandidate, CloudText, CloudToken
from fedlm.fusion.edge import Beliefs
from fedlm.fusion.rules import EdgeOnly, Experts, LogLinear, ProxyTuning, Router, TokenRouting
from fedlm.fusion.step import experts_at, fuse_at, score_target, target_logprobs
from fedlm.fusion.vocab import VocabAligner
from fedlm.models.tiny import tiny_tokenizer
from fedlm.models.token_bytes import token_bytes_table

EDGE = tiny_tokenizer(vocab_size=400)
TABLE = token_bytes_table(EDGE)
ALIGNER = VocabAligner(EDGE, [EDGE.eos_token_id])
PA = EDGE(" Paris", add_special_tokens=False)["input_ids"][0]  # " Pa"
CANDIDATES = [CloudCandidate(TABLE[PA], math.log(0.9)), CloudCandidate(b" Rome", math.log(0.05))]


def _logprobs(seed: int) -> torch.Tensor:
    return torch.randn(len(TABLE), generator=torch.Generator().manual_seed(seed)).log_softmax(-1)


def test_without_candidates_the_rule_sees_no_cloud_and_the_device_belief_stands() -> None:
    beliefs = Beliefs(_logprobs(0), _logprobs(1))
    for rule in (EdgeOnly(), LogLinear(), ProxyTuning(), TokenRouting(threshold=1.0)):
        step = fuse_at(rule, ALIGNER, beliefs, None)
        assert not step.cloud_informed and torch.equal(step.logprobs, beliefs.adapted)
    step = fuse_at(Router(), ALIGNER, beliefs, None)  # the router still weighs base against adapted
    assert not step.cloud_informed
    assert torch.equal(step.logprobs, Router().fuse(Experts(beliefs.base, None, beliefs.adapted)))


def test_the_cloud_is_projected_against_the_device_belief_and_the_rule_sees_base_and_adapted() -> None:
    beliefs = Beliefs(_logprobs(0), _logprobs(1))
    experts = experts_at(ALIGNER, beliefs, CANDIDATES)
    projection = ALIGNER.project(CANDIDATES, beliefs.adapted)  # the adapted edge: the device's own belief
    assert torch.equal(experts.edge, beliefs.base) and torch.equal(experts.adapted, beliefs.adapted)
    assert torch.equal(experts.cloud.logprobs, projection.logprobs)
    step = fuse_at(ProxyTuning(), ALIGNER, beliefs, CANDIDATES)
    expected = ProxyTuning().fuse(Experts(beliefs.base, projection, beliefs.adapted))
    assert step.cloud_informed and torch.equal(step.logprobs, expected)


def test_plain_edge_beliefs_fuse_as_experts_of_the_edge_alone() -> None:
    edge = _logprobs(2)
    step = fuse_at(LogLinear(0.5), ALIGNER, Beliefs(edge), CANDIDATES)
    projection = ALIGNER.project(CANDIDATES, edge)
    expected = (0.5 * edge + 0.5 * projection.logprobs).log_softmax(-1)
    assert step.cloud_informed and torch.allclose(step.logprobs, expected, atol=1e-6)
    cloud_alone = fuse_at(ProxyTuning(), ALIGNER, Beliefs(edge), CANDIDATES)  # no adapter: the cloud itself
    assert (
        torch.allclose(cloud_alone.logprobs, projection.logprobs, atol=1e-6)
        and int(cloud_alone.logprobs.argmax()) == PA
    )


def _cloud_reading(pieces: list[tuple[str, float]], start: int) -> CloudText:
    """A cloud that read the text from `start` as `pieces` (its own tokens), each with its logprob and itself as
    the only candidate."""
    tokens, at = {}, start
    for text, logprob in pieces:
        own = CloudCandidate(text.encode(), logprob)
        tokens[at] = CloudToken(text, own.raw, logprob, at, at + len(text), (own,))
        at += len(text)
    return CloudText(tokens)


def test_a_mixture_is_scored_between_shared_boundaries_each_model_in_its_own_tokens() -> None:
    # the edge reads " Paris" as " Pa" + "ris"; the cloud as one token " Paris", then " is" shared by both
    context = "Q:"
    edge_ids = EDGE(" Paris is", add_special_tokens=False)["input_ids"]
    starts = [len(context)]
    for token in edge_ids[:-1]:
        starts.append(starts[-1] + len(TABLE[token].decode()))
    assert len(edge_ids) == 3 and starts[2] == len(context + " Paris")
    beliefs = [_logprobs(seed) for seed in range(3)]
    cloud = _cloud_reading([(" Paris", math.log(0.6)), (" is", math.log(0.5))], len(context))
    positions = [
        (token, at, experts_at(ALIGNER, Beliefs(before), cloud.candidates_at(at)))
        for token, at, before in zip(edge_ids, starts, beliefs, strict=True)
    ]
    assert positions[1][2].cloud is None  # "ris" starts inside the cloud's " Paris": no shared boundary
    end = len(context + " Paris is")
    total, informed = score_target(Router(), positions, cloud, end)
    expected = 0.0
    for first, last, cloud_logprob in ((0, 2, math.log(0.6)), (2, 3, math.log(0.5))):
        weights = Router().mixture_weights(positions[first][2])
        edge_logprob = sum(float(beliefs[i][edge_ids[i]]) for i in range(first, last))
        expected += math.log(weights["edge"] * math.exp(edge_logprob) + weights["cloud"] * math.exp(cloud_logprob))
    assert informed == [True] * 3 and math.isclose(total, expected, rel_tol=1e-9)
    # each token's share by the chain rule: none is above certainty, and together they make the stretches' sum
    per_token, _ = target_logprobs(Router(), positions, cloud, end)
    assert all(value <= 0 for value in per_token) and math.isclose(sum(per_token), expected, rel_tol=1e-9)
    # a product rule is scored token by token instead, the edge alone where the cloud has no boundary
    total, informed = score_target(LogLinear(0.5), positions, cloud, end)
    by_token = sum(float(LogLinear(0.5).fuse(experts)[token]) for token, _, experts in positions)
    assert informed == [True, False, True] and math.isclose(total, by_token, rel_tol=1e-9)
    # where the cloud said nothing at all, the mixture is the edge alone
    silent = [
        (token, at, experts_at(ALIGNER, Beliefs(before), None))
        for token, at, before in zip(edge_ids, starts, beliefs, strict=True)
    ]
    total, informed = score_target(Router(), silent, CloudText({}), end)
    assert informed == [False] * 3 and math.isclose(
        total, sum(float(b[t]) for t, b in zip(edge_ids, beliefs, strict=True)), rel_tol=1e-9
    )

"""The one fuse step: what is projected against what, and what the rule sees."""

import math

import torch

from fedlm.cloud.logprobs import CloudCandidate
from fedlm.fusion.edge import Beliefs
from fedlm.fusion.rules import EdgeOnly, Experts, LogLinear, ProxyTuning, Router, TokenRouting
from fedlm.fusion.step import experts_at, fuse_at
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

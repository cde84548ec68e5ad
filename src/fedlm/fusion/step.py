"""One fusion step: at one position, the edge's beliefs and the cloud's candidates there become one distribution.

The co-decoding loop, the fused scorer and the fusion benchmark all fuse through here, so they agree on what is
projected against what: the cloud's top-k candidates are spread over the edge vocabulary following the device's own
belief (`Beliefs.local`), and the rule sees the base model, the adapted model (when there is one) and that
projection. Where the cloud said nothing (not asked, late, or no shared text boundary) the rule sees no cloud.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedlm.cloud.logprobs import CloudCandidate, CloudText
from fedlm.fusion.edge import Beliefs
from fedlm.fusion.rules import Experts, FusionRule
from fedlm.fusion.vocab import VocabAligner


@dataclass(frozen=True)
class FusedStep:
    logprobs: torch.Tensor  # the fused next-token log-probabilities over the edge vocabulary
    cloud_informed: bool  # whether the cloud's candidates took part (else the rule saw the edge alone)


def experts_at(aligner: VocabAligner, beliefs: Beliefs, candidates: list[CloudCandidate] | None) -> Experts:
    """The experts at one position: the edge's beliefs and, when the cloud has candidates here, their projection.

    Several rules can fuse the same experts (the benchmark compares them on one reading)."""
    projection = aligner.project(candidates, beliefs.local) if candidates else None
    return Experts(beliefs.base, projection, beliefs.adapted)


def fuse_at(
    rule: FusionRule, aligner: VocabAligner, beliefs: Beliefs, candidates: list[CloudCandidate] | None
) -> FusedStep:
    """Fuse the edge's `beliefs` with the cloud's `candidates` at one position under `rule`."""
    experts = experts_at(aligner, beliefs, candidates)
    return FusedStep(rule.fuse(experts), experts.cloud is not None)


def score_target(
    rule: FusionRule, positions: Sequence[tuple[int, int, Experts]], cloud: CloudText, end: int
) -> tuple[float, int]:
    """The fused log-probability of a target read in the edge's tokens, and how many of them the cloud informed.

    `positions` holds (token id, start offset, experts) for each target token; the text ends at character `end`.
    A rule that mixes (`mixture_weights`) is scored one shared boundary to the next: from a token start that both
    tokenizers share to the next one, the segment's probability is the weighted sum of what each model gives that
    stretch of text in its own tokens, weighted at the segment's start. Any other rule is scored token by token,
    over the edge vocabulary, with the cloud's candidates projected where it has them.
    """
    if not positions:
        return 0.0, 0
    if rule.mixture_weights(positions[0][2]) is None:
        total = sum(float(rule.fuse(experts)[token]) for token, _, experts in positions)
        return total, sum(experts.cloud is not None for _, _, experts in positions)
    # segments open at the first target token and at every later one where the cloud has a token start too
    opens = [i for i, (_, _, experts) in enumerate(positions) if i == 0 or experts.cloud is not None]
    total, informed = 0.0, 0
    for first, stop in zip(opens, [*opens[1:], len(positions)], strict=True):
        segment = positions[first:stop]
        weights = rule.mixture_weights(segment[0][2])
        assert weights is not None
        segment_end = positions[stop][1] if stop < len(positions) else end
        parts = []
        for name, weight in weights.items():
            if weight <= 0:
                continue
            if name == "cloud":
                logprob = cloud.logprob_between(segment[0][1], segment_end)
            else:
                logprob = sum(float(getattr(experts, name)[token]) for token, _, experts in segment)
            parts.append(math.log(weight) + logprob)
        total += float(torch.logsumexp(torch.tensor(parts, dtype=torch.float64), 0))
        informed += len(segment) if "cloud" in weights else 0
    return total, informed

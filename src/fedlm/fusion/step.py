"""One fusion step: at one position, the edge's beliefs and the cloud's candidates there become one distribution.

The co-decoding loop, the fused scorer and the fusion benchmark all fuse through here, so they agree on what is
projected against what: the cloud's top-k candidates are spread over the edge vocabulary following the device's own
belief (`Beliefs.local`), and the rule sees the base model, the adapted model (when there is one) and that
projection. Where the cloud said nothing (not asked, late, or no shared text boundary) the rule sees no cloud.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlm.cloud.logprobs import CloudCandidate
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

"""One fusion step: at one position, the edge's beliefs and the cloud's candidates there become one distribution.

The co-decoding loop, the fused scorer and the fusion benchmark all fuse through here, so they agree on what is
projected against what: the cloud's top-k candidates are spread over the edge vocabulary following the device's own
belief (`Beliefs.local`), and the rule sees the base model, the adapted model (when there is one) and that
projection. Where the cloud said nothing (not asked, late, or no shared text boundary) the rule sees no cloud.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
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


def read_experts(
    aligner: VocabAligner, positions: Iterable[tuple[int, int, torch.Tensor]], cloud: CloudText | None
) -> list[tuple[int, int, Experts]]:
    """(token id, start offset, experts) for each (token id, start offset, edge distribution) of a text the cloud
    read as `cloud` (None: the cloud said nothing, the edge stands alone)."""
    return [
        (token, start, experts_at(aligner, Beliefs(before), cloud.candidates_at(start) if cloud else None))
        for token, start, before in positions
    ]


def fuse_at(
    rule: FusionRule, aligner: VocabAligner, beliefs: Beliefs, candidates: list[CloudCandidate] | None
) -> FusedStep:
    """Fuse the edge's `beliefs` with the cloud's `candidates` at one position under `rule`."""
    experts = experts_at(aligner, beliefs, candidates)
    return FusedStep(rule.fuse(experts), experts.cloud is not None)


def score_target(
    rule: FusionRule, positions: Sequence[tuple[int, int, Experts]], cloud: CloudText, end: int
) -> tuple[float, list[bool]]:
    """The fused log-probability of a target read in the edge's tokens, and which of them the cloud informed
    (`target_logprobs`, summed)."""
    logprobs, informed = target_logprobs(rule, positions, cloud, end)
    return sum(logprobs), informed


def target_logprobs(
    rule: FusionRule, positions: Sequence[tuple[int, int, Experts]], cloud: CloudText, end: int
) -> tuple[list[float], list[bool]]:
    """The fused log-probability of each token of a target read in the edge's tokens, and whether the cloud informed
    it. `positions` holds (token id, start offset, experts) for each token; the text ends at character `end`.

    A rule that mixes (`mixture_weights`) is scored one shared boundary to the next: from a token start that both
    tokenizers share to the next one, the stretch's probability is the weighted sum of what each model gives it in
    its own tokens, weighted at the stretch's start. Each token inside gets its share by the chain rule, P(up to
    its end) / P(up to its start), with the cloud's probability of a partial stretch taken pro rata to the
    characters read (the cloud gave none inside its own tokens): so the tokens' values always sum to the stretch's.
    Any other rule is scored token by token over the edge vocabulary, with the cloud's candidates projected where
    it has them.
    """
    if not positions:
        return [], []
    if rule.mixture_weights(positions[0][2]) is None:
        logprobs = [float(rule.fuse(experts)[token]) for token, _, experts in positions]
        return logprobs, [experts.cloud is not None for _, _, experts in positions]
    # stretches open at the first token and at every later one where the cloud has a token start too
    opens = [i for i, (_, _, experts) in enumerate(positions) if i == 0 or experts.cloud is not None]
    logprobs: list[float] = []
    informed: list[bool] = []
    for first, stop in zip(opens, [*opens[1:], len(positions)], strict=True):
        stretch = positions[first:stop]
        weights = rule.mixture_weights(stretch[0][2])
        assert weights is not None
        begin, finish = stretch[0][1], positions[stop][1] if stop < len(positions) else end
        whole_cloud = cloud.logprob_between(begin, finish) if "cloud" in weights else 0.0
        read = {name: 0.0 for name in weights}  # each expert's log-probability of the stretch read so far
        before = 0.0  # the mixture's, up to the current token's start
        for i, (token, _, experts) in enumerate(stretch):
            token_end = stretch[i + 1][1] if i + 1 < len(stretch) else finish
            for name in weights:
                if name == "cloud":
                    read[name] = whole_cloud * (token_end - begin) / max(finish - begin, 1)
                else:
                    read[name] += float(getattr(experts, name)[token])
            parts = [math.log(w) + read[name] for name, w in weights.items() if w > 0]
            upto = float(torch.logsumexp(torch.tensor(parts, dtype=torch.float64), 0))
            logprobs.append(upto - before)
            before = upto
        informed += [weights.get("cloud", 0.0) > 0] * len(stretch)
    return logprobs, informed

"""Fusion rules: how the experts' next-token distributions, all over the edge vocabulary, become one.

Each rule is one small class with one method, `fuse(experts) -> log-probabilities`, and says what it needs: whether
it uses the cloud at all (`uses_cloud`) and whether, given the device's own belief at a position, the cloud is
worth asking there (`wants_cloud`). A decoding loop asks the rule; it never checks which rule it holds. A rule never
sees tokens or text, only distributions, so every rule works with any aligner and any decoding loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from fedlm.fusion.edge import Beliefs
from fedlm.fusion.vocab import Projection


@dataclass(frozen=True)
class Experts:
    """Next-token beliefs at one position, each as log-probabilities over the edge vocabulary."""

    edge: torch.Tensor | None  # the base edge model; None when an adapted edge spared that pass (`needs_base`)
    cloud: Projection | None = None  # None: the cloud was not asked, was late, or had no shared boundary here
    adapted: torch.Tensor | None = None  # the edge model with a LoRA adapter, when one is loaded

    @property
    def local(self) -> torch.Tensor:
        """The best on-device belief (`Beliefs.local`): the adapted edge when there is one."""
        return Beliefs(self.edge, self.adapted).local


class FusionRule(Protocol):
    name: str
    uses_cloud: bool  # False: the cloud is never asked (the decoder runs without one)
    needs_base: bool  # True: it reads the base edge beside an adapted one (else the edge spares that pass)

    def wants_cloud(self, local: torch.Tensor) -> bool:
        """Whether the cloud is worth asking at a position where the device believes `local` (log-probabilities)."""
        ...

    def fuse(self, experts: Experts) -> torch.Tensor: ...

    def mixture_weights(self, experts: Experts) -> dict[str, float] | None:
        """For a rule that mixes the experts' distributions (p = sum w_i p_i), the weights it gives each expert
        ("edge", "adapted", "cloud") at this position; None for any other rule.

        A mixture whose weights depend only on what came before is a proper distribution over whole strings too,
        so a text can be scored one shared token boundary to the next with each model's own tokens, which spares
        the projection where the two tokenizers cut the text differently."""
        ...


class CloudRule:
    """What most rules need: the cloud, at every position. A rule that needs less overrides these."""

    uses_cloud = True
    needs_base = False

    def wants_cloud(self, local: torch.Tensor) -> bool:
        return True

    def mixture_weights(self, experts: Experts) -> dict[str, float] | None:
        return None


def entropy(logprobs: torch.Tensor) -> float:
    return float(-(logprobs.exp() * logprobs).sum())


def _normalise(logits: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(-1)


class EdgeOnly:
    """No fusion: the baseline that every rule falls back to. It never asks the cloud."""

    name = "none"
    uses_cloud = False
    needs_base = False

    def wants_cloud(self, local: torch.Tensor) -> bool:
        return False

    def fuse(self, experts: Experts) -> torch.Tensor:
        return experts.local

    def mixture_weights(self, experts: Experts) -> dict[str, float] | None:
        return None


@dataclass
class LogLinear(CloudRule):
    """log p = (1 - w) log p_edge + w log p_cloud, renormalised: a product of experts with a fixed weight."""

    weight: float = 0.5
    name: str = "linear"

    def fuse(self, experts: Experts) -> torch.Tensor:
        if experts.cloud is None:
            return experts.local
        return _normalise((1 - self.weight) * experts.local + self.weight * experts.cloud.logprobs)


class Router(CloudRule):
    """A parameter-free mixture: each expert is weighted by its own confidence at this token.

    Confidence is exp(-entropy): an expert that spreads its mass wide says it does not know. The cloud's entropy is
    its own (top-k plus one bucket for the unseen rest), not that of its projection, which borrows the edge's shape.
    The weights need no training and no tuning: they are recomputed at every token from the experts' outputs.
    """

    name = "router"
    needs_base = True

    def mixture_weights(self, experts: Experts) -> dict[str, float]:
        assert experts.edge is not None, "the router reads the base edge (needs_base)"
        scores = {"edge": entropy(experts.edge)}
        if experts.adapted is not None:
            scores["adapted"] = entropy(experts.adapted)
        if experts.cloud is not None:
            scores["cloud"] = experts.cloud.entropy
        top = min(scores.values())
        raw = {name: math.exp(-(h - top)) for name, h in scores.items()}
        total = sum(raw.values())
        return {name: w / total for name, w in raw.items()}

    def fuse(self, experts: Experts) -> torch.Tensor:
        beliefs = {
            "edge": experts.edge,
            "adapted": experts.adapted,
            "cloud": experts.cloud.logprobs if experts.cloud else None,
        }
        mixed = None
        for name, weight in self.mixture_weights(experts).items():
            part = beliefs[name] + math.log(weight)
            mixed = part if mixed is None else torch.logaddexp(mixed, part)
        return mixed


class ProxyTuning(CloudRule):
    """log p = log p_cloud + (log p_adapted - log p_edge): the adapter's learned shift, applied to the cloud.

    Without an adapter the shift is zero and this is the cloud alone; without the cloud, the adapted edge.
    """

    name = "proxy"
    needs_base = True

    def fuse(self, experts: Experts) -> torch.Tensor:
        if experts.cloud is None:
            return experts.local
        assert experts.edge is not None, "proxy tuning reads the base edge (needs_base)"
        shift = experts.adapted - experts.edge if experts.adapted is not None else 0.0
        return _normalise(experts.cloud.logprobs + shift)


@dataclass
class TokenRouting(CloudRule):
    """Ask the cloud only where the edge is unsure (its top probability below `threshold`), then use the cloud."""

    threshold: float = 0.5
    name: str = "route"

    def wants_cloud(self, local: torch.Tensor) -> bool:
        return float(local.max().exp()) < self.threshold

    def fuse(self, experts: Experts) -> torch.Tensor:
        if experts.cloud is None or not self.wants_cloud(experts.local):
            return experts.local
        return experts.cloud.logprobs


RULES = {"none": EdgeOnly, "linear": LogLinear, "router": Router, "proxy": ProxyTuning, "route": TokenRouting}


def make_rule(name: str) -> FusionRule:
    if name not in RULES:
        raise ValueError(f"unknown fusion rule {name!r}; choose one of {', '.join(RULES)}")
    return RULES[name]()

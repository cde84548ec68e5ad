"""Fusion rules: how the experts' next-token distributions, all over the edge vocabulary, become one.

Each rule is one small class with one method, `fuse(experts) -> log-probabilities`. A rule never sees tokens or
text, only distributions, so every rule works with any aligner and any decoding loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from fedlm.fusion.vocab import Projection


@dataclass(frozen=True)
class Experts:
    """Next-token beliefs at one position, each as log-probabilities over the edge vocabulary."""

    edge: torch.Tensor
    cloud: Projection | None = None  # None: the cloud was not asked, was late, or had no shared boundary here
    adapted: torch.Tensor | None = None  # the edge model with a LoRA adapter, when one is loaded


class FusionRule(Protocol):
    name: str

    def fuse(self, experts: Experts) -> torch.Tensor: ...


def entropy(logprobs: torch.Tensor) -> float:
    return float(-(logprobs.exp() * logprobs).sum())


def _normalise(logits: torch.Tensor) -> torch.Tensor:
    return logits.log_softmax(-1)


def _local(experts: Experts) -> torch.Tensor:
    """The best on-device belief: the adapted edge when there is one."""
    return experts.adapted if experts.adapted is not None else experts.edge


class EdgeOnly:
    """No fusion: the baseline that every rule falls back to."""

    name = "none"

    def fuse(self, experts: Experts) -> torch.Tensor:
        return _local(experts)


@dataclass
class LogLinear:
    """log p = (1 - w) log p_edge + w log p_cloud, renormalised: a product of experts with a fixed weight."""

    weight: float = 0.5
    name: str = "linear"

    def fuse(self, experts: Experts) -> torch.Tensor:
        if experts.cloud is None:
            return _local(experts)
        return _normalise((1 - self.weight) * _local(experts) + self.weight * experts.cloud.logprobs)


class Router:
    """A parameter-free mixture: each expert is weighted by its own confidence at this token.

    Confidence is exp(-entropy): an expert that spreads its mass wide says it does not know. The cloud's entropy is
    its own (top-k plus one bucket for the unseen rest), not that of its projection, which borrows the edge's shape.
    The weights need no training and no tuning: they are recomputed at every token from the experts' outputs.
    """

    name = "router"

    def weights(self, experts: Experts) -> dict[str, float]:
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
        for name, weight in self.weights(experts).items():
            part = beliefs[name] + math.log(weight)
            mixed = part if mixed is None else torch.logaddexp(mixed, part)
        return mixed


class ProxyTuning:
    """log p = log p_cloud + (log p_adapted - log p_edge): the adapter's learned shift, applied to the cloud.

    Without an adapter the shift is zero and this is the cloud alone; without the cloud, the adapted edge.
    """

    name = "proxy"

    def fuse(self, experts: Experts) -> torch.Tensor:
        if experts.cloud is None:
            return _local(experts)
        shift = experts.adapted - experts.edge if experts.adapted is not None else 0.0
        return _normalise(experts.cloud.logprobs + shift)


@dataclass
class TokenRouting:
    """Ask the cloud only where the edge is unsure (its top probability below `threshold`), then use the cloud."""

    threshold: float = 0.5
    name: str = "route"

    def wants_cloud(self, edge_logprobs: torch.Tensor) -> bool:
        return float(edge_logprobs.max().exp()) < self.threshold

    def fuse(self, experts: Experts) -> torch.Tensor:
        if experts.cloud is None or not self.wants_cloud(_local(experts)):
            return _local(experts)
        return experts.cloud.logprobs


RULES = {"none": EdgeOnly, "linear": LogLinear, "router": Router, "proxy": ProxyTuning, "route": TokenRouting}


def make_rule(name: str) -> FusionRule:
    if name not in RULES:
        raise ValueError(f"unknown fusion rule {name!r}; choose one of {', '.join(RULES)}")
    return RULES[name]()

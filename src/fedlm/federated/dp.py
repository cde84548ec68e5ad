"""Client-side differential privacy for a LoRA update: clip its norm, add Gaussian noise, account (ε, δ).

Each client privatises its own update U = (A - A₀, B - B₀) before it leaves the device: U is scaled to L2 norm at
most `clip`, and N(0, (sigma·clip)²) noise is added to every coordinate. This is the Gaussian mechanism on the
client's whole dataset (user-level DP), applied once per round in which the client takes part; Opacus's RDP
accountant composes the rounds and picks sigma for a target ε.

Opacus's PrivacyEngine is not used: it wraps the model to capture per-sample gradients, and with PEFT that path
has silently corrupted LoRA weights (Opacus issue #820). Here the model is never wrapped; the noise is added to
plain arrays after training, and tests check that the noisy path still learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedlm.federated.lora import LoraPair, LoraState

DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class DpPlan:
    epsilon: float
    delta: float
    clip: float
    noise_multiplier: float
    rounds: int


def plan(epsilon: float, rounds: int, clip: float, delta: float = DEFAULT_DELTA) -> DpPlan:
    """The noise multiplier that spends exactly `epsilon` over `rounds` full-participation rounds."""
    from opacus.accountants.utils import get_noise_multiplier

    sigma = get_noise_multiplier(
        target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=rounds, accountant="rdp"
    )
    return DpPlan(epsilon, delta, clip, float(sigma), rounds)


def spent(noise_multiplier: float, rounds: int, delta: float = DEFAULT_DELTA) -> float:
    """ε spent after `rounds` releases, by Opacus's RDP accountant."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, 1.0, rounds)]
    return float(accountant.get_epsilon(delta))


def privatize(
    start: LoraState, trained: LoraState, clip: float, noise_multiplier: float, rng: np.random.Generator
) -> tuple[LoraState, float]:
    """`start` + clipped, noised (trained - start); also returns the update's norm before clipping."""
    deltas = {name: (pair.a - start[name].a, pair.b - start[name].b) for name, pair in trained.items()}
    norm = float(np.sqrt(sum(np.sum(da**2) + np.sum(db**2) for da, db in deltas.values())))
    scale = min(1.0, clip / max(norm, 1e-12))
    std = noise_multiplier * clip
    noisy: LoraState = {}
    for name, (da, db) in deltas.items():
        a = start[name].a + scale * da + rng.normal(0.0, std, da.shape)
        b = start[name].b + scale * db + rng.normal(0.0, std, db.shape)
        noisy[name] = LoraPair(a.astype(np.float32), b.astype(np.float32))
    return noisy, norm

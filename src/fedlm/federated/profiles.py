"""Device profiles → LoRA plan (rank and target modules).

A device grants fine-tuning a memory and a compute budget. Adapter and optimizer memory grow linearly with the
rank, so the rank is the largest power of two (2..32) that the memory budget affords; devices with compute to
spare also adapt the key and output projections, weak ones only query and value (the LoRA paper's default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_RANK, MAX_RANK = 2, 32
ATTENTION_QV = ("q_proj", "v_proj")
ATTENTION_ALL = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class DeviceProfile:
    memory_mb: float  # memory the device lets fine-tuning use beyond the frozen model
    gflops: float  # sustained compute it lends to training


@dataclass(frozen=True)
class LoraPlan:
    rank: int
    targets: tuple[str, ...]


BUDGETS: dict[str, DeviceProfile] = {
    "low": DeviceProfile(memory_mb=64, gflops=50),
    "mid": DeviceProfile(memory_mb=256, gflops=200),
    "high": DeviceProfile(memory_mb=1024, gflops=1000),
}
MB_PER_RANK = 32  # adapter + AdamW state + activations of the LoRA path, per rank, for a ~100M-parameter SLM
COMPUTE_FOR_ALL_PROJECTIONS = 500


def plan_for(profile: DeviceProfile) -> LoraPlan:
    affordable = max(profile.memory_mb / MB_PER_RANK, MIN_RANK)
    rank = min(MAX_RANK, 2 ** int(math.log2(affordable)))
    targets = ATTENTION_ALL if profile.gflops >= COMPUTE_FOR_ALL_PROJECTIONS else ATTENTION_QV
    return LoraPlan(rank, targets)


def parse_profile_map(spec: str) -> list[str]:
    """`--rank-profile low,mid,high`: budgets handed to partitions round-robin (one name: every device)."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in BUDGETS]
    if not names or unknown:
        raise ValueError(f"unknown device budget(s) {unknown or spec!r}: use a comma list of {', '.join(BUDGETS)}")
    return names


def budget_for(partition_id: int, profile_map: list[str]) -> str:
    return profile_map[partition_id % len(profile_map)]

"""The run's settings: one dataclass that travels as a flat Flower config (run config or message config)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedlm.models.registry import EDGE_DEFAULT


@dataclass(frozen=True)
class TrainConfig:
    model: str = EDGE_DEFAULT
    data: str = "gsm8k"
    clients: int = 3
    rounds: int = 3
    local_steps: int = 10
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 2e-3  # for a rank-32 adapter; lower ranks get more (local.rank_scaled_lr)
    aggregator: str = "flexlora"
    rank_profile: str = "low,mid,high"
    cluster: str = "off"  # "auto": cluster clients by update similarity after the first round
    max_clusters: int = 4
    dp_epsilon: float = 0.0  # 0: no differential privacy
    dp_clip: float = 1.0
    max_texts: int = 64
    seed: int = 0
    min_replies: int = 1  # the fewest usable updates a round needs; nodes that fail are left out down to this
    participation: float = 1.0  # the fraction of nodes asked to train each round (a seeded sample; all at 1.0)
    fail_rate: float = 0.0  # chaos for testing fault handling: each asked client fails its round with this chance
    out: str = "runs/federated"

    @property
    def out_path(self) -> Path:
        return Path(self.out)

    def to_flat(self) -> dict[str, str | int | float]:
        return asdict(self)

    @classmethod
    def from_flat(cls, flat: dict) -> TrainConfig:
        """Build from a Flower config; keys may use `-` (as in `--run-config`) or `_`."""
        known = {f.name: f.type for f in fields(cls)}
        values = {}
        for key, value in flat.items():
            name = key.replace("-", "_")
            if name in known:
                values[name] = value
        config = cls(**values)
        casts = {"str": str, "int": int, "float": float}
        return cls(**{f.name: casts[f.type](getattr(config, f.name)) for f in fields(cls)})

    def fingerprint(self) -> dict:
        """What must match for a checkpoint to be resumed (rounds and output folder may change)."""
        return {k: v for k, v in self.to_flat().items() if k not in {"rounds", "out", "min_replies"}}

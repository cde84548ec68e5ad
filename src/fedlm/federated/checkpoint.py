"""Atomic per-round checkpoints: a killed run resumes from its last complete round.

A checkpoint is written with `fedlm.atomic`, so the file on disk is always a whole round, never half of one.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from fedlm import atomic

CHECKPOINT = "checkpoint.pkl"


def save(folder: str | Path, state: Any) -> Path:
    return atomic.write_bytes(Path(folder) / CHECKPOINT, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL))


def load(folder: str | Path) -> Any:
    """The last complete round's state, or None when the run starts fresh."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        return pickle.load(handle)

"""Atomic per-round checkpoints: a killed run resumes from its last complete round.

A checkpoint is written to a temporary file in the same folder and renamed over the old one, so the file on
disk is always a whole round, never half of one.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

CHECKPOINT = "checkpoint.pkl"


def save(folder: str | Path, state: Any) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT}-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            pickle.dump(state, handle, protocol=pickle.HIGHEST_PROTOCOL)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, folder / CHECKPOINT)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / CHECKPOINT


def load(folder: str | Path) -> Any:
    """The last complete round's state, or None when the run starts fresh."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return None
    with path.open("rb") as handle:
        return pickle.load(handle)


def write_text_atomically(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)

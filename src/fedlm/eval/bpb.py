"""Bits per byte, from any `Scorer`.

BPB: bits per byte = (sum over rows of -log2 p(target | prompt)) / (sum over rows of UTF-8 bytes of target).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from fedlm.data.jsonl import BpbRow
from fedlm.eval.scorers import Scorer
from fedlm.eval.timing import timing


def evaluate_bpb(rows: list[BpbRow], scorer: Scorer, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    pairs = [(row.prompt, row.target) for row in rows]
    start = time.perf_counter()
    scores = scorer.score(pairs, progress)
    seconds = time.perf_counter() - start
    total_bytes = sum(len(row.target.encode()) for row in rows)
    bits = -sum(scores) / math.log(2)
    return {
        "n": len(rows),
        "bits_per_byte": bits / total_bytes,
        "target_bytes": total_bytes,
        **timing(seconds, len(rows), len(pairs)),
    }

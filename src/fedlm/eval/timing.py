"""The timing fields every evaluation result carries."""

from __future__ import annotations


def timing(seconds: float, rows: int, calls: int) -> dict[str, float | int]:
    return {
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 3) if seconds else 0.0,
        "scored_texts": calls,
    }

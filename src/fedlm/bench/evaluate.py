"""Multiple-choice accuracy and bits per byte, from any `Scorer`.

MCQ: each choice is scored as the target `" " + choice` after the context `"Question: {question}\\nAnswer:"`;
the prediction is the choice with the highest summed log-likelihood (`accuracy`), and, as a second view that does
not favour short choices, the highest log-likelihood per UTF-8 byte (`accuracy_norm`).

BPB: bits per byte = (sum over rows of -log2 p(target | prompt)) / (sum over rows of UTF-8 bytes of target).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, Literal

from fedlm.bench.scorers import Pair, Scorer
from fedlm.data.jsonl import BpbRow, McqRow

Task = Literal["mcq", "bpb"]


def mcq_context(row: McqRow) -> str:
    return f"Question: {row.question}\nAnswer:"


def mcq_pairs(row: McqRow) -> list[Pair]:
    context = mcq_context(row)
    return [(context, f" {choice}") for choice in row.choices]


def answer_pair(row: McqRow) -> Pair:
    """The question with its right answer: how an MCQ row becomes a (context, response) pair to train on."""
    return mcq_context(row), f" {row.choices[row.answer]}"


def evaluate_mcq(rows: list[McqRow], scorer: Scorer, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    pairs = [pair for row in rows for pair in mcq_pairs(row)]
    start = time.perf_counter()
    scores = scorer.score(pairs, progress)
    seconds = time.perf_counter() - start
    correct = correct_norm = 0
    at = 0
    for row in rows:
        own = scores[at : at + len(row.choices)]
        at += len(row.choices)
        per_byte = [s / len(f" {c}".encode()) for s, c in zip(own, row.choices, strict=True)]
        correct += int(max(range(len(own)), key=own.__getitem__) == row.answer)
        correct_norm += int(max(range(len(own)), key=per_byte.__getitem__) == row.answer)
    return {
        "n": len(rows),
        "accuracy": correct / len(rows),
        "accuracy_norm": correct_norm / len(rows),
        **_timing(seconds, len(rows), len(pairs)),
    }


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
        **_timing(seconds, len(rows), len(pairs)),
    }


def _timing(seconds: float, rows: int, calls: int) -> dict[str, float | int]:
    return {
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 3) if seconds else 0.0,
        "scored_texts": calls,
    }

"""Multiple-choice accuracy, from any `Scorer`.

MCQ: each choice is scored as the target `" " + choice` after the context `"Question: {question}\\nAnswer:"`;
the prediction is the choice with the highest summed log-likelihood (`accuracy`), and, as a second view that does
not favour short choices, the highest log-likelihood per UTF-8 byte (`accuracy_norm`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fedlm.data.jsonl import McqRow
from fedlm.eval.scorers import Pair, Scorer
from fedlm.eval.timing import timing


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
    right: list[bool] = []
    correct_norm = 0
    at = 0
    for row in rows:
        own = scores[at : at + len(row.choices)]
        at += len(row.choices)
        per_byte = [s / len(f" {c}".encode()) for s, c in zip(own, row.choices, strict=True)]
        right.append(max(range(len(own)), key=own.__getitem__) == row.answer)
        correct_norm += int(max(range(len(own)), key=per_byte.__getitem__) == row.answer)
    return {
        "n": len(rows),
        "accuracy": sum(right) / len(rows),
        "right": right,  # per row, in order: for accuracy over any subset
        "accuracy_norm": correct_norm / len(rows),
        **timing(seconds, len(rows), len(pairs)),
    }

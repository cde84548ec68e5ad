"""Which Shakespeare play is this speech from? A multiple-choice task built from the Gutenberg texts.

The speeches come from `fedlm.data.shakespeare` (offline, parsed once). Twelve well-known plays are the answers;
every question offers its own play and three others, in a shuffled order. Speeches are split once, by a seeded
shuffle, into a held-out part (questions for evaluation) and a training part (pairs for fitting a fuser), so
nothing evaluated was trained on. Measured here (chance 0.25): on the first 40 held-out questions SmolLM2-135M
0.30 and Gemma-3-270M 0.40, on the first 100 0.26 and 0.29. Neither model knows the task.
"""

from __future__ import annotations

import random
from typing import Literal

from fedlm.data.jsonl import McqRow
from fedlm.data.shakespeare import load_roles

TITLES = {
    "hamlet": "Hamlet",
    "macbeth": "Macbeth",
    "othello": "Othello",
    "lear": "King Lear",
    "romeo_and_juliet": "Romeo and Juliet",
    "julius_caesar": "Julius Caesar",
    "tempest": "The Tempest",
    "merchant_of_venice": "The Merchant of Venice",
    "midsummer_nights_dream": "A Midsummer Night's Dream",
    "twelfth_night": "Twelfth Night",
    "much_ado_about_nothing": "Much Ado About Nothing",
    "richard_iii": "Richard III",
}
QUESTION = 'Which Shakespeare play is this speech from?\n"{speech}"'
HELDOUT = 400  # speeches kept for evaluation; the rest may be trained on
MIN_CHARS, MAX_CHARS = 80, 300
Split = Literal["heldout", "train"]


def _speeches(split: Split) -> list[tuple[str, str]]:
    """(play, speech) pairs of one split, in a fixed order."""
    speeches = sorted(
        (role.split("/")[0], speech)
        for role, said in load_roles().items()
        if role.split("/")[0] in TITLES
        for speech in said
        if MIN_CHARS <= len(speech) <= MAX_CHARS
    )
    random.Random(0).shuffle(speeches)
    return speeches[:HELDOUT] if split == "heldout" else speeches[HELDOUT:]


def play_questions(n: int, split: Split = "heldout", seed: int = 0) -> list[McqRow]:
    """The first n questions of a split: the speech, and four titles of which one is right."""
    speeches = _speeches(split)
    if n > len(speeches):
        raise ValueError(f"the {split} split has {len(speeches)} speeches, {n} asked")
    rng = random.Random(seed)
    rows = []
    for play, speech in speeches[:n]:
        choices = [TITLES[p] for p in rng.sample(sorted(set(TITLES) - {play}), 3)] + [TITLES[play]]
        rng.shuffle(choices)
        rows.append(
            McqRow(question=QUESTION.format(speech=speech), choices=choices, answer=choices.index(TITLES[play]))
        )
    return rows

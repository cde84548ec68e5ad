"""Facts only one model knows: "In which city does NAME live?", to check what a transmitter's KV cache carries.

The people are synthetic (seeded picks from 20 first names and 20 surnames), each living in one of eight cities.
A device's adapter memorises them, as a device would its user's contacts; the base model cannot know them. A
receiver that answers them better with that device's cache fused in than without it (or than with the cache
zeroed) has read the answer off the transmitter. Which-play questions cannot show this: neither model knows
that task, so what a fuser gains there it learns on the receiver's own cache.
"""

from __future__ import annotations

import random
from collections.abc import Collection

from fedlm.data.jsonl import McqRow

FIRST = [
    "Mira",
    "Tomas",
    "Ines",
    "Kofi",
    "Lena",
    "Arjun",
    "Yuki",
    "Omar",
    "Sofia",
    "Pavel",
    "Amara",
    "Jonas",
    "Leila",
    "Diego",
    "Hana",
    "Felix",
    "Nadia",
    "Ravi",
    "Elif",
    "Marco",
]
LAST = [
    "Okafor",
    "Lindqvist",
    "Moreau",
    "Tanaka",
    "Haddad",
    "Novak",
    "Silva",
    "Brandt",
    "Kowalski",
    "Mensah",
    "Rossi",
    "Varga",
    "Ito",
    "Nakamura",
    "Fischer",
    "Dubois",
    "Costa",
    "Petrov",
    "Sato",
    "Kaur",
]
CITIES = ("Paris", "Tokyo", "Cairo", "Lima", "Oslo", "Delhi", "Rome", "Sydney")
QUESTION = "In which city does {person} live?"


def city_facts(n: int, seed: int = 0, exclude: Collection[str] = ()) -> list[tuple[str, str]]:
    """`n` distinct people (none of those in `exclude`), each with the city they live in."""
    everyone = [f"{first} {last}" for first in FIRST for last in LAST if f"{first} {last}" not in exclude]
    if not 1 <= n <= len(everyone):
        raise ValueError(f"between 1 and {len(everyone)} facts can be made, {n} asked")
    rng = random.Random(seed)
    people = rng.sample(everyone, n)
    return [(person, rng.choice(CITIES)) for person in people]


def strangers(n: int, known: list[tuple[str, str]], seed: int = 0) -> list[str]:
    """`n` people from the same name lists who are not among `known`: a device's negatives, the names it must learn
    that it knows nothing about (each shares a first or a last name with many people it does know)."""
    taken = {person for person, _ in known}
    free = [f"{first} {last}" for first in FIRST for last in LAST if f"{first} {last}" not in taken]
    if not 0 <= n <= len(free):
        raise ValueError(f"{len(free)} people are left beside the {len(taken)} known, {n} asked")
    return random.Random(seed).sample(free, n)


def fact_questions(facts: list[tuple[str, str]]) -> list[McqRow]:
    """One question per fact, every city a choice (chance 1/8)."""
    return [
        McqRow(question=QUESTION.format(person=person), choices=list(CITIES), answer=CITIES.index(city))
        for person, city in facts
    ]

"""World-knowledge questions from a real table: countries' capitals and demonyms, offline from `countryinfo`.

The `countryinfo` PyPI package ships one JSON file per country. Each country of at least a million people gives two
four-way questions, "What is the capital of X?" and "What is the demonym for people from X?", whose distractors
are other countries' values of the same field, from the same region first (so they are plausible). Countries are
split in two with a fixed seed, and both questions of a country go to the same half: `dev` is for diagnosis and for
calibrating a setting, `test` for reporting, and the two share no country. A question whose answer is spelled in
the question itself ("the demonym for people from Chad" → "Chadian" is fine, "Djibouti" → "Djibouti" is not) is
left out.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from typing import Literal

from fedlm.data.jsonl import DataError, McqRow

PACKAGE = "countryinfo"
SEED = 20261201
MIN_POPULATION = 1_000_000
FIELDS = {"capital": "What is the capital of {name}?", "demonym": "What is the demonym for people from {name}?"}
Split = Literal["dev", "test"]


def _countries() -> list[dict[str, str]]:
    """Countries with a name, capital, demonym and region and at least `MIN_POPULATION` people, by name."""
    try:
        files = resources.files(PACKAGE).joinpath("data")
    except ModuleNotFoundError as err:
        raise DataError(f"country questions need the {PACKAGE} package: pip install 'fedlm[data]'") from err
    found: dict[str, dict[str, str]] = {}
    for path in files.iterdir():
        if not path.name.endswith(".json"):
            continue
        record = json.loads(path.read_text(encoding="utf-8"))
        try:
            people = int(record.get("population") or 0)
        except (TypeError, ValueError):
            people = 0
        values = {key: record.get(key) or "" for key in ("name", "capital", "demonym", "region")}
        if people >= MIN_POPULATION and all(isinstance(v, str) and v for v in values.values()):
            found.setdefault(values["name"], values)
    return [found[name] for name in sorted(found)]


def _question(country: dict[str, str], field: str, pool: list[dict[str, str]], rng: random.Random) -> McqRow:
    answer = country[field]
    others = [c for c in pool if c["name"] != country["name"] and c[field] != answer]
    near = sorted({c[field] for c in others if c["region"] == country["region"]})
    far = sorted({c[field] for c in others} - set(near))
    rng.shuffle(near)
    rng.shuffle(far)
    choices = [*(near + far)[:3], answer]
    rng.shuffle(choices)
    return McqRow(question=FIELDS[field].format(name=country["name"]), choices=choices, answer=choices.index(answer))


def country_questions(split: Split, limit: int | None = None) -> list[McqRow]:
    """The `dev` or `test` questions (both questions of each country of that half), in a fixed shuffled order."""
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    rng = random.Random(SEED)
    countries = _countries()
    order = countries[:]
    rng.shuffle(order)
    half = order[: len(order) // 2] if split == "dev" else order[len(order) // 2 :]
    rows = [_question(c, field, countries, rng) for c in half for field in FIELDS]
    rows = [r for r in rows if r.choices[r.answer] not in r.question]
    rng.shuffle(rows)
    return rows[:limit]

"""Synthetic private facts: the same for every caller, one city per distinct person, clear errors."""

import pytest

from fedlm.data.facts import CITIES, city_facts, fact_questions


def test_facts_are_seeded_distinct_and_asked_with_every_city_as_a_choice() -> None:
    facts = city_facts(240)
    assert facts == city_facts(240) and facts != city_facts(240, seed=1)
    assert len({person for person, _ in facts}) == 240
    assert {city for _, city in facts} == set(CITIES)
    rows = fact_questions(facts[:3])
    assert [r.choices[r.answer] for r in rows] == [city for _, city in facts[:3]]
    for (person, _), row in zip(facts[:3], rows, strict=True):
        assert person in row.question and row.choices == list(CITIES)


@pytest.mark.parametrize("n", [0, 401])
def test_impossible_counts_are_refused(n: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 400"):
        city_facts(n)

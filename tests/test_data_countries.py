"""Country questions: a real table, two halves that share no country, plausible distractors, no giveaways."""

import re

from fedlm.data.countries import country_questions
from fedlm.data.jsonl import McqRow


def test_dev_and_test_share_no_country_and_are_stable() -> None:
    dev, test = country_questions("dev"), country_questions("test")
    assert len(dev) > 100 and len(test) > 100

    def country(row: McqRow) -> str:
        return re.fullmatch(r"What is the (?:capital of|demonym for people from) (.+)\?", row.question).group(1)

    assert not {country(r) for r in dev} & {country(r) for r in test}
    assert country_questions("dev", limit=20) == dev[:20]  # the same questions every time


def test_questions_are_four_way_with_the_answer_once_and_never_given_away() -> None:
    rows = country_questions("dev") + country_questions("test")
    for row in rows:
        assert len(row.choices) == 4 and len(set(row.choices)) == 4
        assert row.choices[row.answer] not in row.question
    france = [r for r in rows if r.question == "What is the capital of France?"]
    assert len(france) == 1 and france[0].choices[france[0].answer] == "Paris"

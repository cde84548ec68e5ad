"""The labelled set and the evaluation: span matching, and the quality targets on the built-in set."""

from __future__ import annotations

import json

import pytest

from fedlm.bench.privacy import Label, default_labelled_path, evaluate, load_labelled, match
from fedlm.privacy.detector import SENSITIVE_TYPES, Entity


def test_matching_needs_same_type_and_overlap() -> None:
    labels = (Label("PERSON", 5, 18), Label("PHONE_NUMBER", 22, 38))
    found = (Entity("PERSON", 5, 11, 0.8, "Daniel"), Entity("PERSON", 22, 38, 0.9, "+44..."))
    hits, extra, misses = match(labels, found)
    assert hits == [labels[0]]
    assert extra == [found[1]]
    assert misses == [labels[1]]


def test_labelled_set_is_consistent_and_mixed() -> None:
    rows = [json.loads(line) for line in default_labelled_path().read_text().splitlines()]
    assert len(rows) >= 100
    sensitive = [r for r in rows if r["entities"]]
    assert 0.4 * len(rows) <= len(sensitive) <= 0.8 * len(rows)
    types = {e["type"] for r in rows for e in r["entities"]}
    assert types <= set(SENSITIVE_TYPES) and len(types) >= 10
    for row in rows:
        for entity in row["entities"]:
            assert row["text"][entity["start"] : entity["end"]] == entity["text"]


def test_load_labelled_reports_the_bad_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"text": "ok", "entities": []}\n{"text": "short", "entities": [{"type": "PERSON", "start": 0, "end": 99}]}\n'
    )
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_labelled(path)


def test_targets_on_the_built_in_set() -> None:
    """Recall >= 0.95 and precision >= 0.9 on sensitive prompts; nothing clean is altered more than rarely."""
    result = evaluate(load_labelled())
    assert result["prompts"]["recall"] >= 0.95
    assert result["prompts"]["precision"] >= 0.9
    assert result["entities"]["overall"]["recall"] >= 0.95
    assert result["entities"]["overall"]["precision"] >= 0.9
    changed = result["clean_prompts_changed"]["redact"]
    assert changed["changed"] <= 0.05 * changed["of"]

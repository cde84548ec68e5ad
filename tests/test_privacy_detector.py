"""The full detector (Presidio + offline spaCy model + our recognizers): spans, threshold, and no network."""

from __future__ import annotations

import itertools
import socket

import pytest

from fedlm.privacy.detector import Detector


@pytest.fixture(scope="module")
def detector() -> Detector:
    found = Detector()
    found.load()
    return found


def test_spans_are_character_offsets_into_the_text(detector: Detector) -> None:
    text = "Hi, I'm Miguel Santos, mail miguel.santos88@gmail.com or call +351 912 345 678. Card 4111 1111 1111 1111."
    scan = detector.scan(text)
    assert scan.sensitive
    assert {(e.type, e.text) for e in scan.entities} == {
        ("PERSON", "Miguel Santos"),
        ("EMAIL_ADDRESS", "miguel.santos88@gmail.com"),
        ("PHONE_NUMBER", "+351 912 345 678"),
        ("CREDIT_CARD", "4111 1111 1111 1111"),
    }
    for entity in scan.entities:
        assert text[entity.start : entity.end] == entity.text
        assert 0.5 <= entity.score <= 1.0
    starts = [e.start for e in scan.entities]
    assert starts == sorted(starts)


def test_spans_never_overlap(detector: Detector) -> None:
    scan = detector.scan("Refund IBAN DE89 3704 0044 0532 0130 00 and account number 40308669 to Jonas Weber.")
    assert {e.type for e in scan.entities} == {"IBAN_CODE", "BANK_ACCOUNT", "PERSON"}
    spans = sorted((e.start, e.end) for e in scan.entities)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))


@pytest.mark.parametrize(
    "text",
    [
        "What is the capital of France?",
        "What are the common symptoms of diabetes?",
        "Convert the date 12/03/2024 to ISO 8601 format.",
        "How do I rotate an API key in AWS without downtime?",
    ],
)
def test_ordinary_prompts_are_not_sensitive(detector: Detector, text: str) -> None:
    scan = detector.scan(text)
    assert not scan.sensitive, scan.entities


def test_health_condition_next_to_a_named_person(detector: Detector) -> None:
    scan = detector.scan("Karen Lewis was treated for breast cancer last year, write her a card.")
    assert [(e.type, e.text) for e in scan.entities] == [
        ("PERSON", "Karen Lewis"),
        ("HEALTH_CONDITION", "breast cancer"),
    ]


def test_threshold_is_tunable(detector: Detector) -> None:
    text = "Order (415) 555-2671 arrived."  # a phone shape without a phone word scores below 0.5
    assert not detector.scan(text).sensitive
    assert Detector(threshold=0.4).scan(text).types == ["PHONE_NUMBER"]
    assert not Detector(threshold=0.99).scan("Call Daniel Okafor on +44 20 7946 0958.").sensitive
    with pytest.raises(ValueError, match="threshold"):
        Detector(threshold=1.5)


def test_scanning_never_opens_a_connection(detector: Detector, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    scan = Detector(cache_size=0).scan("Mail jordan.reyes@northwind-mail.com or visit https://example.org/page")
    assert scan.types == ["EMAIL_ADDRESS"]
    assert attempts == []


def test_repeated_texts_come_from_the_cache(detector: Detector) -> None:
    text = "Tell Sofia Rossi the flight moved."
    assert detector.scan(text) is detector.scan(text)

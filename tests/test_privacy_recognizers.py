"""Our own recognizers, run directly (no spaCy needed): checksums, shapes, and the context they require."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedlm.privacy.recognizers import (
    HealthConditionRecognizer,
    IbanRecognizer,
    PhoneRecognizer,
    aba_routing_is_valid,
    api_key_recognizer,
    bank_account_recognizer,
    date_of_birth_recognizer,
    iban_is_valid,
    password_recognizer,
    person_cue_recognizer,
)


def found(recognizer, text: str) -> list[str]:
    return [text[r.start : r.end] for r in sorted(recognizer.analyze(text, [], None), key=lambda r: r.start)]


@pytest.mark.parametrize(
    "iban",
    ["DE89 3704 0044 0532 0130 00", "GB29NWBK60161331926819", "FR1420041010050500013M02606", "NO9386011117947"],
)
def test_valid_ibans_pass_the_mod97_check(iban: str) -> None:
    assert iban_is_valid(iban)


@pytest.mark.parametrize(
    "iban",
    [
        "DE89 3704 0044 0532 0130 01",  # last digit changed: checksum fails
        "DE88 3704 0044 0532 0130 00",  # check digits changed
        "DE89 3704 0044 0532 0130 0",  # one character short for Germany
        "GB29NWBK6016133192681",
        "XX00",
    ],
)
def test_invalid_ibans_fail(iban: str) -> None:
    assert not iban_is_valid(iban)


@given(position=st.integers(min_value=4, max_value=21), digit=st.integers(min_value=0, max_value=9))
def test_any_single_digit_error_in_an_iban_is_caught(position: int, digit: int) -> None:
    iban = "DE89370400440532013000"
    if iban[position] == str(digit):
        return
    assert not iban_is_valid(iban[:position] + str(digit) + iban[position + 1 :])


def test_iban_span_stops_at_the_country_length() -> None:
    text = "Pay DE89 3704 0044 0532 0130 00 1234 today, not DE89 3704 0044 0532 0130 01."
    assert found(IbanRecognizer(), text) == ["DE89 3704 0044 0532 0130 00"]


def test_aba_routing_checksum() -> None:
    assert aba_routing_is_valid("021000021")
    assert not aba_routing_is_valid("021000022")
    assert found(bank_account_recognizer(), "routing number 021000021, routing 123456789") == ["021000021"]


def test_bank_account_needs_an_account_word() -> None:
    recognizer = bank_account_recognizer()
    assert found(recognizer, "My account number is 40308669 and sort code 40-47-84.") == ["40308669", "40-47-84"]
    assert found(recognizer, "The order 40308669 shipped on 40-47-84.") == []


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("key sk-proj-4fGh7KlMn0pQrS2tUvWx9yZaB3cD5eF fails", "sk-proj-4fGh7KlMn0pQrS2tUvWx9yZaB3cD5eF"),
        ("export GITHUB_TOKEN=ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"),
        ("aws AKIAIOSFODNN7EXAMPLE denied", "AKIAIOSFODNN7EXAMPLE"),
        ('API_KEY = "9f8e7d6c5b4a39281706f5e4d3c2b1a0"', "9f8e7d6c5b4a39281706f5e4d3c2b1a0"),
        ("Authorization: Bearer abcDEF123456ghiJKL789", "abcDEF123456ghiJKL789"),
    ],
)
def test_api_keys(text: str, key: str) -> None:
    assert found(api_key_recognizer(), text) == [key]


def test_words_after_key_are_not_secrets() -> None:
    assert found(api_key_recognizer(), "How do I rotate an API key in AWS? The token expired yesterday.") == []
    assert found(api_key_recognizer(), "the secret is authentication-middleware") == []  # no digits: a word


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("My password is Tr0ub4dor&3, is it strong?", "Tr0ub4dor&3"),
        ("log in with password: S3cure!Pass2024 now", "S3cure!Pass2024"),
        ("db_password=p@ssw0rd_prod in settings.ini", "p@ssw0rd_prod"),
        ("the wifi passphrase is BlueHorse-42-Lamp.", "BlueHorse-42-Lamp"),
    ],
)
def test_passwords(text: str, value: str) -> None:
    assert found(password_recognizer(), text) == [value]


def test_talk_about_passwords_is_not_a_password() -> None:
    recognizer = password_recognizer()
    assert found(recognizer, "What is a good password policy? My password is strong.") == []
    assert found(recognizer, "How should a company store user passwords securely?") == []


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("Call me on +44 20 7946 0958 tomorrow.", "+44 20 7946 0958"),
        ("mobile 0049 151 23456789", "0049 151 23456789"),
        ("You can phone me at +33 6 12 34 56 78 after six.", "+33 6 12 34 56 78"),
        ("My cell is (415) 555-2671.", "(415) 555-2671"),
    ],
)
def test_phone_numbers(text: str, number: str) -> None:
    results = PhoneRecognizer().analyze(text, [], None)
    assert [text[r.start : r.end] for r in results] == [number]
    assert results[0].score >= 0.5


def test_phone_rejects_invalid_numbers_and_bare_national_shapes() -> None:
    assert found(PhoneRecognizer(), "+44 12 3") == []
    low = PhoneRecognizer().analyze("Order (415) 555-2671 arrived.", [], None)
    assert all(r.score < 0.5 for r in low)  # valid shape, but no phone word nearby


@pytest.mark.parametrize(
    ("text", "date"),
    [
        ("Hannah was born on 14 March 1990.", "14 March 1990"),
        ("My date of birth is 1985-07-23, what is my sign?", "1985-07-23"),
        ("DOB: 02/11/1978.", "02/11/1978"),
        ("I was born on July 4, 1992 in Ohio.", "July 4, 1992"),
    ],
)
def test_dates_of_birth(text: str, date: str) -> None:
    assert found(date_of_birth_recognizer(), text) == [date]


def test_other_dates_are_not_birth_dates() -> None:
    assert found(date_of_birth_recognizer(), "Convert 12/03/2024 to ISO format; the meeting is on 1 May 2025.") == []


def test_health_condition_needs_a_person() -> None:
    recognizer = HealthConditionRecognizer()
    assert found(recognizer, "I was diagnosed with type 2 diabetes last month.") == ["type 2 diabetes"]
    assert found(recognizer, "My son has ADHD. What are the symptoms of asthma?") == ["ADHD"]
    assert found(recognizer, "What are the common symptoms of diabetes?") == []
    assert found(recognizer, "How does a heart attack differ from cardiac arrest?") == []


def test_names_after_a_cue() -> None:
    recognizer = person_cue_recognizer()
    assert found(recognizer, "Remind Victor Lindqvist to renew, and email Anna Berg.") == [
        "Victor Lindqvist",
        "Anna Berg",
    ]
    assert found(recognizer, "Send it to First Harbor Bank on Monday.") == []

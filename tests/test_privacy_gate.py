"""The egress gate: each policy's effect on the bytes that leave, the audit record, and restoring answers."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from fedlm.privacy import AuditLog, Detector, EgressBlocked, EgressGate, Policy, Scan

SECRET_KEY = "sk-proj-4fGh7KlMn0pQrS2tUvWx9yZaB3cD5eF"
SENSITIVE = f"I'm Priya Raman, my key {SECRET_KEY} returns 401 and my IBAN DE89 3704 0044 0532 0130 00 bounced."
CLEAN = "Explain how photosynthesis works in simple terms."


@pytest.fixture(scope="module")
def detector() -> Detector:
    found = Detector()
    found.load()
    return found


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    return AuditLog(tmp_path / "audit.jsonl")


def chat(text: str) -> dict:
    return {"model": "cloud", "messages": [{"role": "user", "content": text}], "max_tokens": 8, "logprobs": True}


def test_policy_names() -> None:
    assert Policy.parse("Redact") is Policy.REDACT
    assert EgressGate(audit="unused.jsonl").policy is Policy.OFF  # the default
    with pytest.raises(ValueError, match=re.escape("off | local | redact | rephrase")):
        Policy.parse("encrypt")


def test_off_sends_the_body_unchanged_and_audits_it(log: AuditLog) -> None:
    body = chat(SENSITIVE)
    payload = EgressGate("off", audit=log).outbound("http://127.0.0.1:9/v1/chat/completions", body)
    assert payload == json.dumps(body, separators=(",", ":")).encode()
    [record] = log.records()
    assert (record.action, record.policy, record.bytes, record.removed) == ("sent", "off", len(payload), {})
    assert record.sha256 == hashlib.sha256(payload).hexdigest()


def test_local_blocks_a_sensitive_body(detector: Detector, log: AuditLog) -> None:
    gate = EgressGate("local", detector=detector, audit=log)
    with pytest.raises(EgressBlocked, match="API_KEY") as blocked:
        gate.outbound("http://127.0.0.1:9/v1/completions", {"prompt": [CLEAN, SENSITIVE]})
    assert set(blocked.value.entity_types) == {"API_KEY", "IBAN_CODE", "PERSON"}
    [record] = log.records()
    assert (record.action, record.bytes) == ("blocked", 0)
    assert record.removed == {"API_KEY": 1, "IBAN_CODE": 1, "PERSON": 1}


def test_local_lets_a_clean_body_through(detector: Detector, log: AuditLog) -> None:
    body = {"model": "cloud", "prompt": CLEAN}
    assert (
        EgressGate("local", detector=detector, audit=log).outbound("cloud", body)
        == json.dumps(body, separators=(",", ":")).encode()
    )
    assert log.records()[0].action == "sent"


def test_redact_uses_consistent_typed_placeholders(detector: Detector, log: AuditLog) -> None:
    gate = EgressGate("redact", detector=detector, audit=log)
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Tell Sofia Rossi to call +44 20 7946 0958."}]},
            {"role": "user", "content": "Did Sofia Rossi call back?"},
        ],
        "temperature": 0,
    }
    sent = json.loads(gate.outbound("cloud", body))
    assert sent["messages"][0]["content"] == "Be brief."
    assert sent["messages"][1]["content"] == [{"type": "text", "text": "Tell <PERSON_1> to call <PHONE_NUMBER_1>."}]
    assert sent["messages"][2]["content"] == "Did <PERSON_1> call back?"
    assert sent["temperature"] == 0
    again = json.loads(gate.outbound("cloud", {"prompt": "Sofia Rossi and Daniel Okafor"}))
    assert again["prompt"] == "<PERSON_1> and <PERSON_2>"
    assert log.records()[0].removed == {"PERSON": 2, "PHONE_NUMBER": 1}


def test_redact_leaves_clean_prompts_byte_identical(detector: Detector, log: AuditLog) -> None:
    body = chat(CLEAN) | {"text": "What causes inflation?"}
    off = EgressGate("off", audit=log).outbound("cloud", body)
    assert EgressGate("redact", detector=detector, audit=log).outbound("cloud", body) == off


def test_inbound_restores_placeholders(detector: Detector, log: AuditLog) -> None:
    gate = EgressGate("redact", detector=detector, audit=log)
    gate.outbound("cloud", {"prompt": "Write to Jonas Weber at l.brandt@kanzlei-brandt.de"})
    answer = {
        "choices": [
            {"index": 0, "text": "Dear <PERSON_1>, I wrote to <EMAIL_ADDRESS_1>. <PERSON_9> is unknown."},
            {"index": 1, "message": {"role": "assistant", "content": "Hello <PERSON_1>"}},
        ]
    }
    restored = gate.inbound("cloud", answer)
    assert restored["choices"][0]["text"] == (
        "Dear Jonas Weber, I wrote to l.brandt@kanzlei-brandt.de. <PERSON_9> is unknown."
    )
    assert restored["choices"][1]["message"]["content"] == "Hello Jonas Weber"
    assert answer["choices"][0]["text"].startswith("Dear <PERSON_1>")  # the input is not mutated


def test_inbound_restores_placeholders_split_across_stream_chunks(detector: Detector, log: AuditLog) -> None:
    gate = EgressGate("redact", detector=detector, audit=log)
    gate.outbound("cloud", {"prompt": "Remind Victor Lindqvist about the passport."})
    pieces = ["Sure, <PER", "SON_", "1> will", " be reminded", ", <PERSON_1", ">"]
    out = []
    for i, piece in enumerate(pieces):
        chunk = {"id": "c1", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
        if i == len(pieces) - 1:
            chunk["choices"][0]["finish_reason"] = "stop"
        out.append(gate.inbound("cloud", chunk)["choices"][0]["delta"]["content"])
    assert "".join(out) == "Sure, Victor Lindqvist will be reminded, Victor Lindqvist"
    assert "<" not in "".join(out)


def test_rephrase_rewrites_only_sensitive_texts_and_redacts_the_rewrite(detector: Detector, log: AuditLog) -> None:
    seen: list[str] = []

    def careless_rewriter(text: str) -> str:
        seen.append(text)
        return f"Generic question about {text} mentioning Daniel Okafor"

    gate = EgressGate("rephrase", detector=detector, audit=log, rewriter=careless_rewriter)
    sent = gate.outbound("cloud", {"prompt": [CLEAN, "Call Tomasz Kowalski about the shipment."]})
    prompts = json.loads(sent)["prompt"]
    assert prompts[0] == CLEAN  # clean text is never rewritten
    assert seen == ["Call <PERSON_1> about the shipment."]  # the rewriter sees no detected value
    assert prompts[1] == "Generic question about Call <PERSON_1> about the shipment. mentioning <PERSON_2>"
    assert b"Okafor" not in sent and b"Kowalski" not in sent
    restored = gate.inbound("cloud", {"choices": [{"text": "Ask <PERSON_1>."}]})
    assert restored["choices"][0]["text"] == "Ask Tomasz Kowalski."


def test_audit_log_never_holds_the_secret(detector: Detector, log: AuditLog) -> None:
    gate = EgressGate("redact", detector=detector, audit=log)
    payload = gate.outbound("https://user:pw@cloud.example/v1/chat/completions?key=abc", chat(SENSITIVE))
    with pytest.raises(EgressBlocked):
        EgressGate("local", detector=detector, audit=log).outbound("cloud", chat(SENSITIVE))
    raw = log.path.read_text()
    for secret in (SECRET_KEY, "Priya", "DE89", "pw@", "key=abc"):
        assert secret not in raw
    sent, blocked = log.records()
    assert sent.destination == "https://cloud.example/v1/chat/completions"
    assert sent.bytes == len(payload) and sent.sha256 == hashlib.sha256(payload).hexdigest()
    assert blocked.bytes == 0 and blocked.action == "blocked"
    assert gate.last_seconds > 0


@pytest.mark.parametrize("policy", ["off", "local", "redact", "rephrase"])
def test_no_policy_writes_a_secret_into_the_audit_log(detector: Detector, log: AuditLog, policy: str) -> None:
    """Real PII (a name, an IBAN, an API key) through every policy, the destination carrying credentials too: the
    audit log keeps what left (bytes, a hash, entity counts), never a value."""
    gate = EgressGate(policy, detector=detector, audit=log, rewriter=lambda text: f"A question about {text}")
    try:
        gate.outbound("https://user:pw@cloud.example/v1/chat/completions?key=abc", chat(SENSITIVE))
    except EgressBlocked:
        assert policy == "local"
    raw = log.path.read_text()
    for secret in (SECRET_KEY, "Priya", "DE89", "pw@", "key=abc"):
        assert secret not in raw, f"{policy} wrote {secret!r} into the audit log"
    (record,) = log.records()
    assert record.policy == policy and record.destination == "https://cloud.example/v1/chat/completions"


def test_non_text_fields_and_token_prompts_pass_untouched(detector: Detector, log: AuditLog) -> None:
    body = {"prompt": [[1, 2, 3]], "user": "Priya Raman", "stop": ["\n"], "messages": "not a list"}
    sent = json.loads(EgressGate("redact", detector=detector, audit=log).outbound("cloud", body))
    assert sent == body


def test_outbound_rejects_a_non_object_body(log: AuditLog) -> None:
    with pytest.raises(TypeError, match="JSON object"):
        EgressGate("off", audit=log).outbound("cloud", ["not", "a", "dict"])  # type: ignore[arg-type]


def test_a_value_known_to_be_sensitive_is_masked_wherever_it_appears(detector: Detector, log: AuditLog) -> None:
    gate = EgressGate("redact", detector=detector, audit=log)
    gate.outbound("cloud", {"prompt": "My PIN is 4821, do not share it."})
    sent = json.loads(gate.outbound("cloud", {"prompt": "Is 4821 a weak choice? Order 48210 is unrelated."}))
    assert sent["prompt"] == "Is <PASSWORD_1> a weak choice? Order 48210 is unrelated."
    local = EgressGate("local", detector=detector, audit=log)
    with pytest.raises(EgressBlocked):
        local.outbound("cloud", {"prompt": "My PIN is 4821."})
    with pytest.raises(EgressBlocked, match="PASSWORD"):
        local.outbound("cloud", {"prompt": "Is 4821 a weak choice?"})


class CountingDetector(Detector):
    """The real detector, counting the characters it is asked to read."""

    def __init__(self) -> None:
        super().__init__()
        self.read = 0

    def scan(self, text: str) -> Scan:
        self.read += len(text)
        return super().scan(text)


def test_a_session_scans_a_growing_text_once_and_finds_what_a_full_scan_finds(log: AuditLog) -> None:
    counting = CountingDetector()
    gate = EgressGate("redact", detector=counting, audit=log)
    prompt = "Notes from the clinic. " * 40 + SENSITIVE + " The doctor said to rest. "
    answer = "Please contact Priya Raman again next week, and keep the IBAN DE89 3704 0044 0532 0130 00 safe."
    sent = []
    for words in range(1, len(answer.split()) + 1):  # a co-decoding loop resends its growing answer every round
        text = prompt + " ".join(answer.split()[:words])
        sent.append(json.loads(gate.outbound("cloud", {"prompt": text}))["prompt"])
    whole = prompt + answer
    assert gate.scan(whole).entities == Detector().scan(whole).entities
    assert counting.read < len(whole) + len(sent) * 260  # each round rereads its change and 200 characters before
    assert "Priya" not in sent[-1] and "DE89" not in sent[-1] and sent[-1].count("<PERSON_1>") == 2


def test_the_audit_log_stays_open_and_every_record_is_readable_at_once(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with EgressGate("off", audit=path) as gate:
        gate.outbound("cloud", chat(CLEAN))
        assert len(AuditLog(path).records()) == 1  # flushed, though the file is still open
        gate.outbound("cloud", chat(CLEAN))
    assert [r.action for r in AuditLog(path).records()] == ["sent", "sent"]


def test_rephrase_all_rewrites_every_text_once_per_session(log: AuditLog) -> None:
    calls: list[str] = []

    def rewriter(text: str) -> str:
        calls.append(text)
        return "How do plants make food from light?"

    gate = EgressGate("rephrase", audit=log, rewriter=rewriter, rephrase_all=True)
    sent = [json.loads(gate.outbound(f"kv://device-{i}", {"text": CLEAN})) for i in range(4)]
    assert calls == [CLEAN]  # four transmitters, one rewrite
    assert all(body["text"] == "How do plants make food from light?" for body in sent)
    assert json.loads(EgressGate("rephrase", audit=log, rewriter=rewriter).outbound("kv://x", {"text": CLEAN})) == {
        "text": CLEAN
    }  # by default a text with nothing private leaves unchanged

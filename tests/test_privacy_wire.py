"""End to end on loopback: bodies sent through the gate with httpx reach a capturing fake of the cloud service.

The fake records the raw bytes of every request it receives; the test then searches them for the secrets.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from fedlm.privacy import AuditLog, Detector, EgressBlocked, EgressGate

SECRETS = [
    "Priya Raman",
    "priya.raman@example-mail.com",
    "+44 20 7946 0958",
    "4111 1111 1111 1111",
    "DE89 3704 0044 0532 0130 00",
    "sk-proj-4fGh7KlMn0pQrS2tUvWx9yZaB3cD5eF",
    "Tr0ub4dor&3",
    "14 March 1990",
    "type 2 diabetes",
]
CONVERSATION = [
    f"I'm {SECRETS[0]}, mail {SECRETS[1]} or call {SECRETS[2]}.",
    f"Charge card {SECRETS[3]}; refunds to IBAN {SECRETS[4]}.",
    f"My key {SECRETS[5]} fails and my password is {SECRETS[6]}.",
    f"I was born on {SECRETS[7]} and I have {SECRETS[8]}. Did {SECRETS[0]} get the invoice?",
]


class _Capture(BaseHTTPRequestHandler):
    received: list[bytes]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append(body)  # type: ignore[attr-defined]
        prompt = json.loads(body)["messages"][-1]["content"]
        answer = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo: {prompt}"}}]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer.encode())

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture(scope="module")
def cloud() -> Iterator[tuple[str, list[bytes]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)  # port 0: a free loopback port
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1/chat/completions", server.received  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def detector() -> Detector:
    found = Detector()
    found.load()
    return found


def converse(gate: EgressGate, url: str) -> list[str]:
    """Send each turn through the gate; return the (restored) answers, or a marker for a blocked turn."""
    answers = []
    with httpx.Client(timeout=10, trust_env=False) as client:  # no proxy: straight to loopback
        for turn in CONVERSATION:
            body = {"model": "cloud", "messages": [{"role": "user", "content": turn}]}
            try:
                payload = gate.outbound(url, body)
            except EgressBlocked:
                answers.append("[answered on the device]")
                continue
            response = client.post(url, content=payload, headers={"Content-Type": "application/json"})
            answers.append(gate.inbound(url, response.json())["choices"][0]["message"]["content"])
    return answers


@pytest.mark.parametrize("policy", ["local", "redact"])
def test_no_secret_reaches_the_cloud(
    policy: str, cloud: tuple[str, list[bytes]], detector: Detector, tmp_path: Path
) -> None:
    url, received = cloud
    received.clear()
    log = AuditLog(tmp_path / "audit.jsonl")
    answers = converse(EgressGate(policy, detector=detector, audit=log), url)
    wire = b"\n".join(received)
    for secret in SECRETS:
        assert secret.encode() not in wire, f"{secret!r} reached the cloud under {policy}"
    records = log.records()
    assert len(records) == len(CONVERSATION)
    assert [r.bytes for r in records if r.action == "sent"] == [len(body) for body in received]
    if policy == "redact":
        assert len(received) == len(CONVERSATION)
        assert answers[0] == "echo: " + CONVERSATION[0]  # the device gets its own values back
    else:
        assert received == [] and all(a == "[answered on the device]" for a in answers)


def test_the_capture_does_see_secrets_when_the_gate_is_off(cloud: tuple[str, list[bytes]], tmp_path: Path) -> None:
    url, received = cloud
    received.clear()
    converse(EgressGate("off", audit=tmp_path / "audit.jsonl"), url)
    assert all(secret.encode() in b"\n".join(received) for secret in SECRETS)

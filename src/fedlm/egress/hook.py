"""The contract every byte that leaves the device goes through.

A transport (the cloud client, the KV transmitter client) turns each request body into bytes only by calling its
`EgressHook`, and sends exactly what the hook returns. Privacy policies (`fedlm.privacy.EgressGate`) are hooks;
the transport never chooses one, whoever starts the work does. Without one, `AuditOnly` sends bodies unchanged
and still writes every byte to the audit log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from fedlm.egress.audit import AuditLog, AuditRecord


class EgressRefused(RuntimeError):
    """The egress hook kept a request on the device (a privacy policy): nothing was sent."""


class EgressHook(Protocol):
    """`outbound` gives the bytes to send for a body, or raises `EgressRefused` to keep it on the device;
    `inbound` gives back the answer as the device should read it."""

    def outbound(self, destination: str, body: dict[str, Any]) -> bytes: ...

    def inbound(self, destination: str, body: dict[str, Any]) -> dict[str, Any]: ...


def check_body(body: Any) -> dict[str, Any]:
    """`body`, if it is a JSON object (a dict); every request body is one."""
    if not isinstance(body, dict):
        raise TypeError(f"request body must be a JSON object (dict), got {type(body).__name__}")
    return body


def serialize(body: dict[str, Any]) -> bytes:
    """The one wire form of a request body: compact JSON."""
    return json.dumps(check_body(body), separators=(",", ":")).encode()


class AuditOnly:
    """Sends every body unchanged and audits it: the default when nobody chose a privacy policy."""

    policy = "off"

    def __init__(self, audit: AuditLog | Path | str | None = None) -> None:
        self.audit = audit if isinstance(audit, AuditLog) else AuditLog(audit)

    def outbound(self, destination: str, body: dict[str, Any]) -> bytes:
        payload = serialize(body)
        self.audit.append(AuditRecord.for_payload(destination, self.policy, payload, {}))
        return payload

    def inbound(self, destination: str, body: dict[str, Any]) -> dict[str, Any]:
        return body

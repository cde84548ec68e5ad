"""The single choke point for data leaving the device, as one session per generation or conversation.

Every request body bound for a cloud model or a KV transmitter goes through `EgressGate.outbound` (the
`fedlm.egress` hook), which applies the policy to the body's text fields, serialises the result, writes one audit
record for exactly those bytes and returns them: the caller sends what the gate returns and nothing else.
`inbound` undoes the placeholders in the answers, on the device.

A gate is a session: its placeholders stay the same for its whole life, its audit file stays open, and it scans
each new piece of text once. A co-decoding loop resends its growing answer every round; the gate scans only what
changed since the last text it saw, with some text before it so the detector sees each name in context.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

from fedlm.egress import AuditLog, AuditRecord, EgressRefused, check_body, serialize
from fedlm.privacy.detector import DEFAULT_THRESHOLD, Detector, Entity, Scan
from fedlm.privacy.policy import DEFAULT_POLICY, Policy
from fedlm.privacy.redact import Redactor
from fedlm.privacy.rephrase import Rewriter, SlmRewriter

TextFn = Callable[[str], str]
RESCAN_CHARS = 200  # text before a change that is scanned again with it, so the detector sees names in context


class EgressBlocked(EgressRefused):
    """A sensitive request under the `local` policy: it must not leave, so the edge model answers alone."""

    def __init__(self, destination: str, entity_types: list[str]) -> None:
        self.destination = destination
        self.entity_types = entity_types
        super().__init__(
            f"privacy policy 'local' kept a request to {destination} on the device: it contains "
            f"{', '.join(entity_types)}. Answer with the edge model, or choose --privacy redact|rephrase."
        )


def _map_content(content: Any, fn: TextFn) -> Any:
    if isinstance(content, str):
        return fn(content)
    if isinstance(content, list):
        return [
            {**part, "text": fn(part["text"])}
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            else part
            for part in content
        ]
    return content


def map_request_texts(body: dict[str, Any], fn: TextFn) -> dict[str, Any]:
    """A copy of an outgoing body with `fn` applied to `prompt`, `text` and every `messages[*].content` text."""
    out = dict(body)
    for key in ("prompt", "text"):
        value = out.get(key)
        if isinstance(value, str):
            out[key] = fn(value)
        elif isinstance(value, list):
            out[key] = [fn(v) if isinstance(v, str) else v for v in value]
    if isinstance(out.get("messages"), list):
        out["messages"] = [
            {**m, "content": _map_content(m.get("content"), fn)} if isinstance(m, dict) else m for m in out["messages"]
        ]
    return out


def _rescan_from(prior: Scan, text: str) -> int:
    """Where to start scanning `text` again, given the scan of an earlier text of the session (0: all of it)."""
    shared = next((i for i, (a, b) in enumerate(zip(prior.text, text, strict=False)) if a != b), None)
    cut = (min(len(prior.text), len(text)) if shared is None else shared) - RESCAN_CHARS
    if cut <= 0:
        return 0
    while cut > 0 and not text[cut - 1].isspace():
        cut -= 1  # start at a word, never inside one
    for entity in sorted(prior.entities, key=lambda e: -e.start):
        if entity.start < cut < entity.end:
            cut = entity.start  # never inside an entity either
    return cut


class EgressGate:
    """Applies one egress policy to every outgoing body, and audits each one: one session of egress.

    Whoever starts the work (a CLI command, a library caller) builds the gate and hands it to the transports, and
    closes it at the end (`with EgressGate(...) as gate`). The detector (a few seconds to build, shared by every
    gate of the process) loads only when the policy needs it; `off` never scans.
    """

    def __init__(
        self,
        policy: Policy | str = DEFAULT_POLICY,
        *,
        detector: Detector | None = None,
        audit: AuditLog | Path | str | None = None,
        rewriter: Rewriter | None = None,
        threshold: float = DEFAULT_THRESHOLD,
        rephrase_all: bool = False,
    ) -> None:
        self.policy = Policy.parse(policy)
        self.detector = detector or Detector(threshold=threshold)
        self.audit = audit if isinstance(audit, AuditLog) else AuditLog(audit)
        self.rewriter: Rewriter = rewriter or SlmRewriter()
        self.rephrase_all = rephrase_all  # `rephrase` rewrites every text, not only sensitive ones (FedRefine)
        self._rewrites: dict[str, str] = {}
        self.redactor = Redactor()
        self.last_seconds = 0.0  # time the last `outbound` took: detection, rewriting, serialising, auditing
        self._carry: dict[tuple[str, Any, Any], str] = {}
        self._carry_lock = threading.Lock()
        self._last_scan: Scan | None = None
        self._scan_lock = threading.Lock()

    def close(self) -> None:
        """Flush and close the audit log: the session is over."""
        self.audit.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def outbound(self, destination: str, body: dict[str, Any]) -> bytes:
        """The bytes to send for `body`. Raises `EgressBlocked` when the `local` policy keeps it on the device."""
        check_body(body)  # refuse a body that is not a JSON object before anything else
        start = time.perf_counter()
        removed: Counter[str] = Counter()
        outgoing = body
        if self.policy is not Policy.OFF:
            outgoing = self._apply_policy(body, removed)
        if self.policy is Policy.LOCAL and removed:
            self.audit.append(AuditRecord.for_payload(destination, self.policy.value, b"", removed, blocked=True))
            self.last_seconds = time.perf_counter() - start
            raise EgressBlocked(destination, sorted(removed))
        payload = serialize(outgoing)
        self.audit.append(AuditRecord.for_payload(destination, self.policy.value, payload, removed))
        self.last_seconds = time.perf_counter() - start
        return payload

    def _apply_policy(self, body: dict[str, Any], removed: Counter[str]) -> dict[str, Any]:
        """Scan every text first, so a value found in any of them is masked in all; then transform each text.

        `removed` receives the type of every span taken out (or, under `local`, that would have been)."""
        scans: dict[str, Scan] = {}

        def collect(text: str) -> str:
            scans[text] = self.scan(text)
            self.redactor.remember(scans[text])
            return text

        map_request_texts(body, collect)

        def local(text: str) -> str:
            removed.update(entity_type for _, _, entity_type in self.redactor.spans(scans[text]))
            return text

        def redact(text: str) -> str:
            removed.update(entity_type for _, _, entity_type in self.redactor.spans(scans[text]))
            return self.redactor.redact(scans[text])

        def rephrase(text: str) -> str:
            masked = redact(text)
            if masked == text and not self.rephrase_all:
                return text  # nothing private: the prompt leaves unchanged and loses nothing
            with self._scan_lock:
                done = self._rewrites.get(masked)
            if done is None:  # each text is rewritten once per session, however many transmitters it goes to
                done = self.redactor.redact(self.detector.scan(self.rewriter(masked)))
                with self._scan_lock:
                    self._rewrites[masked] = done
            return done

        transform = {Policy.LOCAL: local, Policy.REDACT: redact, Policy.REPHRASE: rephrase}[self.policy]
        return map_request_texts(body, transform)

    def scan(self, text: str) -> Scan:
        """The detector's findings in `text`, scanning only what differs from the last text this gate saw.

        The shared start is trusted up to `RESCAN_CHARS` before the first change (moved back past any entity it
        would cut), and everything from there on is scanned again, so a name is always read with its sentence."""
        with self._scan_lock:
            prior = self._last_scan
        cut = _rescan_from(prior, text) if prior is not None else 0
        if cut == 0:
            found = self.detector.scan(text)
        else:
            assert prior is not None
            tail = self.detector.scan(text[cut:])
            kept = [e for e in prior.entities if e.end <= cut]
            moved = [Entity(e.type, e.start + cut, e.end + cut, e.score, e.text) for e in tail.entities]
            found = Scan(text, (*kept, *moved), tail.seconds)
        with self._scan_lock:
            self._last_scan = found
        return found

    def inbound(self, destination: str, body: dict[str, Any]) -> dict[str, Any]:
        """A copy of a response body (or stream chunk) with this gate's placeholders restored in its texts."""
        if self.policy not in (Policy.REDACT, Policy.REPHRASE) or not isinstance(body.get("choices"), list):
            return body
        restore = self.redactor.restore
        choices = []
        for index, choice in enumerate(body["choices"]):
            if not isinstance(choice, dict):
                choices.append(choice)
                continue
            choice = dict(choice)
            if isinstance(choice.get("text"), str):
                choice["text"] = restore(choice["text"])
            if isinstance(choice.get("message"), dict):
                choice["message"] = {
                    **choice["message"],
                    "content": _map_content(choice["message"].get("content"), restore),
                }
            if isinstance(choice.get("delta"), dict):
                key = (destination, body.get("id"), choice.get("index", index))
                choice["delta"] = self._restore_delta(
                    key, choice["delta"], finished=choice.get("finish_reason") is not None
                )
            choices.append(choice)
        return {**body, "choices": choices}

    def _restore_delta(self, key: tuple[str, Any, Any], delta: dict[str, Any], finished: bool) -> dict[str, Any]:
        """Restore a streamed piece, holding back a trailing fragment of a placeholder until the next piece."""
        content = delta.get("content")
        with self._carry_lock:
            held = self._carry.pop(key, "")
            if not held and not isinstance(content, str):
                return delta
            text = held + (content if isinstance(content, str) else "")
            if not finished:
                text, self._carry[key] = self.redactor.split_partial(text)
                if not self._carry[key]:
                    del self._carry[key]
        return {**delta, "content": self.redactor.restore(text)}

"""Append-only JSONL record of every egress decision: enough to account for each byte, never the content.

A record holds the time, where the bytes went, the policy, how many bytes left, their SHA-256 (so a captured
payload can be matched to its record) and the entity types the gate removed or withheld, with counts. Values
themselves are never written, and URLs lose any user info and query string, where credentials tend to hide.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import urlsplit, urlunsplit

RECENT = 1024  # records kept in memory, for `AuditLog.since`


def default_audit_path() -> Path:
    """`$FEDLM_AUDIT_LOG`, else `~/.fedlm/audit.jsonl`."""
    return Path(os.environ.get("FEDLM_AUDIT_LOG") or Path.home() / ".fedlm" / "audit.jsonl")


def safe_destination(destination: str) -> str:
    """A URL without `user:pass@` and `?query`; anything that is not a URL is kept as is."""
    parts = urlsplit(destination)
    if not parts.scheme or not parts.netloc:
        return destination
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass(frozen=True)
class AuditRecord:
    time: str
    destination: str
    policy: str
    action: str  # "sent" or "blocked"
    bytes: int
    sha256: str
    removed: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_payload(
        cls,
        destination: str,
        policy: str,
        payload: bytes,
        removed: Counter[str] | dict[str, int],
        blocked: bool = False,
    ) -> AuditRecord:
        """The record for `payload`, exactly the bytes that left (empty when blocked)."""
        return cls(
            time=datetime.now(UTC).isoformat(timespec="milliseconds"),
            destination=safe_destination(destination),
            policy=policy,
            action="blocked" if blocked else "sent",
            bytes=len(payload),
            sha256=hashlib.sha256(payload).hexdigest(),
            removed=dict(sorted(removed.items())),
        )


class AuditLog:
    """Appends one JSON line per record to a file it keeps open (opened on the first record).

    Each record is flushed at once, so a killed process loses none; `close` also fsyncs, so the records survive
    the machine. One log serves a whole generation or conversation: a file open and an fsync per record cost more
    than the request they describe.
    """

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path) if path is not None else default_audit_path()
        self._lock = threading.Lock()
        self._handle: IO[str] | None = None
        self.appended = 0  # records this log has written, a mark for `since`
        self._recent: deque[AuditRecord] = deque(maxlen=RECENT)

    def append(self, record: AuditRecord) -> None:
        line = json.dumps(asdict(record), separators=(",", ":")) + "\n"
        with self._lock:
            if self._handle is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._handle = self.path.open("a", encoding="utf-8")
            self._handle.write(line)
            self._handle.flush()
            self.appended += 1
            self._recent.append(record)

    def since(self, mark: int) -> list[AuditRecord]:
        """The records this log wrote after its `appended` count was `mark` (the last `RECENT` at most): what one
        piece of work sent, when nothing else shared the log meanwhile."""
        with self._lock:
            return list(self._recent)[-min(self.appended - mark, len(self._recent)) :] if self.appended > mark else []

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                os.fsync(self._handle.fileno())
                self._handle.close()
                self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def records(self) -> list[AuditRecord]:
        """Every record in order; a missing log has none. A corrupt line raises ValueError naming its number."""
        if not self.path.exists():
            return []
        out = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(AuditRecord(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as err:
                raise ValueError(f"{self.path}:{number}: not an audit record ({err})") from err
        return out


def summarize(records: list[AuditRecord]) -> dict[str, Any]:
    """Totals for `fedlm privacy audit`: requests, bytes and removed entity types, by destination and policy."""
    removed: Counter[str] = Counter()
    for record in records:
        removed.update(record.removed)
    return {
        "records": len(records),
        "sent": sum(r.action == "sent" for r in records),
        "blocked": sum(r.action == "blocked" for r in records),
        "bytes_sent": sum(r.bytes for r in records),
        "by_destination": dict(Counter(r.destination for r in records).most_common()),
        "by_policy": dict(Counter(r.policy for r in records).most_common()),
        "removed": dict(removed.most_common()),
        "first": records[0].time if records else None,
        "last": records[-1].time if records else None,
    }

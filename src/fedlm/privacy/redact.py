"""Typed placeholders for sensitive values, consistent over a session and reversible on the device only."""

from __future__ import annotations

import re
import threading
from collections import Counter

from fedlm.privacy.detector import Scan

PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]*_\d+>")


class Redactor:
    """Maps each distinct sensitive value to a placeholder such as `<PERSON_1>`, the same one every time.

    Consistency matters beyond looks: a multi-turn chat or a co-decoding loop resends the same prompt many times,
    and the cloud model sees one stable stand-in per value. The reverse table never leaves the device.
    """

    def __init__(self) -> None:
        self._by_value: dict[str, str] = {}
        self._by_placeholder: dict[str, str] = {}
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def placeholder(self, entity_type: str, value: str) -> str:
        with self._lock:
            if value not in self._by_value:
                self._counts[entity_type] += 1
                token = f"<{entity_type}_{self._counts[entity_type]}>"
                self._by_value[value] = token
                self._by_placeholder[token] = value
            return self._by_value[value]

    def redact(self, scan: Scan) -> str:
        """The scanned text with every entity replaced; spans come from the scan, so offsets are exact."""
        pieces: list[str] = []
        cursor = 0
        for entity in scan.entities:
            pieces += [scan.text[cursor : entity.start], self.placeholder(entity.type, entity.text)]
            cursor = entity.end
        pieces.append(scan.text[cursor:])
        return "".join(pieces)

    def restore(self, text: str) -> str:
        """Put the original values back; placeholders this session never issued are left alone."""
        return PLACEHOLDER.sub(lambda m: self._by_placeholder.get(m.group(0), m.group(0)), text)

    def split_partial(self, text: str) -> tuple[str, str]:
        """Split off a trailing fragment that may be the start of a placeholder (streams cut tokens anywhere)."""
        cut = text.rfind("<")
        if cut == -1:
            return text, ""
        tail = text[cut:]
        if ">" not in tail and any(token.startswith(tail) for token in self._by_placeholder):
            return text[:cut], tail
        return text, ""

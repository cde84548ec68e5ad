"""Typed placeholders for sensitive values, consistent over a session and reversible on the device only."""

from __future__ import annotations

import re
import threading
from collections import Counter

from fedlm.privacy.detector import Scan

PLACEHOLDER = re.compile(r"<[A-Z][A-Z_]*_\d+>")


def _joins(text: str, index: int, edge: str) -> bool:
    """Whether `text[index]` continues a word past a value's `edge` character ("Ann" inside "Annual")."""
    return 0 <= index < len(text) and text[index].isalnum() and edge.isalnum()


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

    def spans(self, scan: Scan) -> list[tuple[int, int, str]]:
        """What to replace in the scanned text, as (start, end, type): the detected entities, plus every other
        occurrence of a value this session already knows is sensitive, since the detector can find a name in one
        sentence and miss it in the next."""
        found = [(e.start, e.end, e.type) for e in scan.entities]
        for value, token in sorted(self._by_value.items(), key=lambda item: -len(item[0])):
            start = scan.text.find(value)
            while start != -1:
                end = start + len(value)
                inside_word = _joins(scan.text, start - 1, value[0]) or _joins(scan.text, end, value[-1])
                if not inside_word and all(end <= s or start >= e for s, e, _ in found):
                    found.append((start, end, token[1:].rsplit("_", 1)[0]))
                start = scan.text.find(value, end)
        return sorted(found)

    def redact(self, scan: Scan) -> str:
        """The scanned text with every sensitive span replaced by its placeholder."""
        pieces: list[str] = []
        cursor = 0
        for start, end, entity_type in self.spans(scan):
            pieces += [scan.text[cursor:start], self.placeholder(entity_type, scan.text[start:end])]
            cursor = end
        pieces.append(scan.text[cursor:])
        return "".join(pieces)

    def remember(self, scan: Scan) -> None:
        """Register the scan's values, so later texts of the session are checked for them too."""
        for entity in scan.entities:
            self.placeholder(entity.type, entity.text)

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

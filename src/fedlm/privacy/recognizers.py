"""Our own recognizers, for the things Presidio's built-ins miss or flag too loosely.

Each rule is a regular expression whose named group `v` (or the whole match) is the entity, optionally checked by
a validator (a checksum, a phone-number parse). Anchoring on context words ("password", "born on") is part of the
expression itself, so the reported span is just the value and a lone number or word never fires on its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import phonenumbers
from presidio_analyzer import EntityRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts

Validator = Callable[[str], bool]


@dataclass(frozen=True)
class Rule:
    """One expression for one entity type; `validate` gets the matched value and can veto it."""

    pattern: re.Pattern[str]
    score: float
    validate: Validator | None = None


def _span(match: re.Match[str]) -> tuple[int, int]:
    return match.span("v") if "v" in match.re.groupindex else match.span()


class RuleRecognizer(EntityRecognizer):
    """A Presidio recognizer driven by a list of `Rule`s for a single entity type."""

    def __init__(self, entity: str, rules: Iterable[Rule], name: str) -> None:
        self.rules = tuple(rules)
        super().__init__(supported_entities=[entity], name=name, supported_language="en")

    def load(self) -> None:
        """Nothing to load: the rules are compiled at import."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        entity = self.supported_entities[0]
        if entities and entity not in entities:
            return []
        found: dict[tuple[int, int], float] = {}
        for rule in self.rules:
            for match in rule.pattern.finditer(text):
                start, end = _span(match)
                if end <= start or (rule.validate and not rule.validate(text[start:end])):
                    continue
                found[(start, end)] = max(rule.score, found.get((start, end), 0.0))
        return [RecognizerResult(entity, start, end, score) for (start, end), score in found.items()]


# ---------------------------------------------------------------------------------------------- secrets

_KEY_SHAPES = [
    r"sk-(?:proj-|ant-(?:api\d\d-)?|svcacct-)?[A-Za-z0-9_-]{20,}",  # OpenAI, Anthropic
    r"gh[pousr]_[A-Za-z0-9]{30,}",  # GitHub tokens
    r"github_pat_[A-Za-z0-9_]{22,}",
    r"glpat-[A-Za-z0-9_-]{20,}",  # GitLab
    r"(?:AKIA|ASIA)[0-9A-Z]{16}",  # AWS access key id
    r"AIza[0-9A-Za-z_-]{35}",  # Google API key
    r"xox[abposr]-[A-Za-z0-9-]{10,}",  # Slack
    r"hf_[A-Za-z0-9]{30,}",  # Hugging Face
    r"[rsp]k_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe
    r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
]
_KNOWN_KEY = re.compile(r"(?<![\w-])(?:" + "|".join(_KEY_SHAPES) + r")(?![\w-])")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)")
# A long token right after a word that names it as a secret: "api key: 9f8e...", "token=abc...", "Bearer abc...".
_NAMED_SECRET = re.compile(
    r"(?i)\b(?:api[_ -]?key|secret(?:[_ -]?key)?|access[_ -]?(?:key|token)|auth[_ -]?token|token|bearer|"
    r"client[_ -]?secret)"
    r"\b[\"']?(?:\s+(?:is|was))?\s*[:=]?\s*[\"']?(?P<v>[A-Za-z0-9_\-./+=]{16,})"
)


def _looks_random(value: str) -> bool:
    """A secret mixes letters and digits; an English word or a plain number does not."""
    return any(c.isdigit() for c in value) and any(c.isalpha() for c in value)


def api_key_recognizer() -> RuleRecognizer:
    rules = [Rule(_KNOWN_KEY, 0.95), Rule(_PRIVATE_KEY, 1.0), Rule(_NAMED_SECRET, 0.85, _looks_random)]
    return RuleRecognizer("API_KEY", rules, name="FedlmApiKeyRecognizer")


_PW_WORD = r"(?:password|passwd|pwd|passcode|passphrase|pass\s?word|pin(?:\s+code)?)"
# "db_password=..." and "ADMIN_PWD:": the keyword may follow an underscore, so no \b before it.
# "password: x" or "pwd=x" accept any value; "my password is x" needs a value that is not an everyday word.
_PASSWORD_SEP = re.compile(
    rf"(?i)(?<![^\W_]){_PW_WORD}\b\s*[:=]\s*[\"'`]?(?P<v>[^\s\"'`]{{4,}}?)[\"'`]?(?=[.,;)]?(?:\s|$))"
)
_PASSWORD_IS = re.compile(
    rf"(?i)\b{_PW_WORD}\b(?:\s+(?:for|to|on)\s+[\w.@-]+)?\s+(?:is|was|remains|=)\s+(?:now\s+|still\s+)?"
    rf"[\"'`]?(?P<v>[^\s\"'`]{{4,}}?)[\"'`]?(?=[.,;)]?(?:\s|$))"
)


def _not_a_plain_word(value: str) -> bool:
    lowered = value.lower()
    if lowered in {"correct", "wrong", "incorrect", "strong", "weak", "secure", "required", "expired", "invalid"}:
        return False
    return any(not c.isalpha() for c in value) or any(c.isupper() for c in value[1:])


def password_recognizer() -> RuleRecognizer:
    rules = [Rule(_PASSWORD_SEP, 0.9), Rule(_PASSWORD_IS, 0.85, _not_a_plain_word)]
    return RuleRecognizer("PASSWORD", rules, name="FedlmPasswordRecognizer")


# ---------------------------------------------------------------------------------------------- banking

# Official IBAN lengths by country (ISO 13616 registry); a country missing here is checked by checksum alone.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "CH": 21,
    "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18,
    "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23,
    "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27,
    "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29,
    "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "TN": 24, "TR": 26,
    "UA": 29, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_is_valid(value: str) -> bool:
    """ISO 13616: known length for the country, then the mod-97 check of the rearranged number equals 1."""
    iban = re.sub(r"[\s-]", "", value).upper()
    if not re.fullmatch(r"[A-Z]{2}\d{2}[A-Z0-9]{11,30}", iban):
        return False
    expected = IBAN_LENGTHS.get(iban[:2])
    if expected is not None and len(iban) != expected:
        return False
    digits = "".join(str(int(c, 36)) for c in iban[4:] + iban[:4])
    return int(digits) % 97 == 1


class IbanRecognizer(EntityRecognizer):
    """IBANs written with or without spaces; the span is cut to the country's length, then the checksum decides."""

    _CANDIDATE = re.compile(r"(?i)(?<![A-Z0-9])[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]){11,30}")

    def __init__(self) -> None:
        super().__init__(supported_entities=["IBAN_CODE"], name="FedlmIbanRecognizer", supported_language="en")

    def load(self) -> None:
        """Nothing to load."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        if entities and "IBAN_CODE" not in entities:
            return []
        results = []
        for match in self._CANDIDATE.finditer(text):
            start, end = self._trim(text, match.start(), match.end())
            if iban_is_valid(text[start:end]):
                results.append(RecognizerResult("IBAN_CODE", start, end, 1.0))
        return results

    @staticmethod
    def _trim(text: str, start: int, end: int) -> tuple[int, int]:
        """Stop after the country's number of characters so a following word or number is not swallowed."""
        expected = IBAN_LENGTHS.get(text[start : start + 2].upper())
        if expected is None:
            return start, end
        seen = 0
        for i in range(start, end):
            if text[i].isalnum():
                seen += 1
                if seen == expected:
                    return start, i + 1
        return start, end


def aba_routing_is_valid(value: str) -> bool:
    """US ABA routing number: 9 digits whose 3-7-1 weighted sum is a multiple of 10."""
    digits = [int(c) for c in value if c.isdigit()]
    if len(digits) != 9:
        return False
    return sum(w * d for w, d in zip([3, 7, 1] * 3, digits, strict=True)) % 10 == 0


_ACCOUNT = re.compile(
    r"(?i)\b(?:(?:bank\s+)?account|acct|a/c)(?:\s+(?:number|no\.?|num|#))?\s*(?:is\s+|:\s*|#\s*)?"
    r"(?P<v>\d(?:[ -]?\d){5,19})(?![\d-])"
)
_ROUTING = re.compile(r"(?i)\b(?:routing|aba|rtn)(?:\s+(?:number|no\.?|#))?\s*(?:is\s+|:\s*)?(?P<v>\d{9})\b")
_SORT_CODE = re.compile(r"(?i)\bsort\s*code\s*(?:is\s+|:\s*)?(?P<v>\d{2}-\d{2}-\d{2})\b")


def bank_account_recognizer() -> RuleRecognizer:
    rules = [Rule(_ACCOUNT, 0.85), Rule(_ROUTING, 0.9, aba_routing_is_valid), Rule(_SORT_CODE, 0.85)]
    return RuleRecognizer("BANK_ACCOUNT", rules, name="FedlmBankAccountRecognizer")


# ---------------------------------------------------------------------------------------------- phones

# International (+CC or 00CC) and common national shapes; phonenumbers then decides if the number is real.
_PHONE = re.compile(
    r"(?<![\w+/.-])(?P<v>(?:\+|00)[1-9](?:[\s.-]?\(?\d\)?){6,14}|\(?\d{2,5}\)?(?:[\s.-]?\d{2,4}){2,4})(?![\w/-]|\.\d)"
)
_NATIONAL_REGIONS = ("US", "GB", "DE", "FR", "IN", "AU", "NL", "ES", "IT", "CH")
_PHONE_CONTEXT = re.compile(
    r"(?i)\b(?:call|phone|tel|mobile|cell|number|text|sms|whatsapp|reach|contact|fax|ring|dial|line|hotline)"
)


def _parse_phone(value: str) -> float:
    """Score: 0.85 for a valid international number, 0.7 for a valid national one, 0 otherwise."""
    compact = re.sub(r"[^\d+]", "", value)
    if compact.startswith("00"):
        compact = "+" + compact[2:]
    if compact.startswith("+"):
        try:
            return 0.85 if phonenumbers.is_valid_number(phonenumbers.parse(compact, None)) else 0.0
        except phonenumbers.NumberParseException:
            return 0.0
    if not 9 <= len(compact) <= 12:
        return 0.0
    for region in _NATIONAL_REGIONS:
        try:
            if phonenumbers.is_valid_number(phonenumbers.parse(value, region)):
                return 0.7
        except phonenumbers.NumberParseException:
            continue
    return 0.0


class PhoneRecognizer(EntityRecognizer):
    """Phone numbers in international and national formats, validated by libphonenumber.

    A bare national-format number also needs a phone word ("call", "mobile") in the 40 characters before it, since
    order numbers and the like share its shape.
    """

    def __init__(self) -> None:
        super().__init__(supported_entities=["PHONE_NUMBER"], name="FedlmPhoneRecognizer", supported_language="en")

    def load(self) -> None:
        """Nothing to load."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        if entities and "PHONE_NUMBER" not in entities:
            return []
        results = []
        for match in _PHONE.finditer(text):
            start, end = match.span("v")
            score = _parse_phone(text[start:end])
            if score == 0.7 and not _PHONE_CONTEXT.search(text, max(0, start - 40), start):
                score = 0.45
            if score:
                results.append(RecognizerResult("PHONE_NUMBER", start, end, score))
        return results


# ---------------------------------------------------------------------------------------------- birth dates

_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?|"
    r"oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\.?"
)
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_DATE = (
    rf"(?:\d{{1,2}}[/.-]\d{{1,2}}[/.-](?:\d{{4}}|\d{{2}})|\d{{4}}-\d{{2}}-\d{{2}}|"
    rf"(?:{_DAY}\s+(?:of\s+)?{_MONTH},?\s+\d{{4}})|(?:{_MONTH}\s+{_DAY},?\s+\d{{4}}))"
)
_DOB = re.compile(
    rf"(?i)\b(?:born(?:\s+on)?|d\.?o\.?b\.?|date\s+of\s+birth|birth\s*date|birthday(?:\s+is)?)"
    rf"\b\s*(?:is\s+|was\s+)?[:,-]?\s*(?:on\s+)?(?:the\s+)?(?P<v>{_DATE})"
)
_BORN_IN_YEAR = re.compile(r"(?i)\b(?:I|my\s+\w+|he|she)\s+(?:was|were)\s+born\s+in\s+(?P<v>(?:19|20)\d\d)\b")


def date_of_birth_recognizer() -> RuleRecognizer:
    return RuleRecognizer(
        "DATE_OF_BIRTH", [Rule(_DOB, 0.9), Rule(_BORN_IN_YEAR, 0.6)], name="FedlmDateOfBirthRecognizer"
    )


# ---------------------------------------------------------------------------------------------- names

# The small spaCy model misses many full names, mostly unfamiliar ones after a verb ("Remind Victor Lindqvist").
# A run of two or three capitalised words right after a word that introduces a person is a name far more often
# than not; the stop list removes the usual capitalised non-names (institutions, places, calendar words).
_NAME_WORD = r"[A-Z][a-z]+(?:['-][A-Z]?[a-z]+)?"
_NAME_CUE = (
    r"(?i:\b(?:to|for|from|with|call|tell|ask|remind|email|e-mail|text|ring|thank|thanks|invite|pay|refund|meet|"
    r"contact|dear|hi|hello|hey|by|patient|colleague|client|customer|holder|named|name\s+is|I'm|I\s+am|"
    r"this\s+is|cc|attn|attention)\s+)"
)
_CUED_NAME = re.compile(rf"{_NAME_CUE}(?P<v>{_NAME_WORD}(?:\s+{_NAME_WORD}){{1,2}})\b(?!\s+[A-Z])")
_TITLED_NAME = re.compile(rf"(?i:\b(?:mr|mrs|ms|miss|dr|prof)\.?\s+)(?P<v>{_NAME_WORD}(?:\s+{_NAME_WORD})?)\b")
_NOT_NAMES = frozenset({
    "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "january", "february", "march",
    "april", "may", "june", "july", "august", "september", "october", "november", "december", "bank", "street",
    "road", "avenue", "lane", "university", "college", "school", "hospital", "clinic", "company", "inc", "ltd",
    "llc", "group", "team", "service", "services", "department", "office", "ministry", "airport", "hotel", "station",
    "park", "centre", "center", "church", "museum", "river", "mount", "lake", "north", "south", "east", "west",
    "new", "old", "united", "states", "kingdom", "republic", "city", "county", "world", "war", "national",
    "international", "global", "general", "american", "british", "european", "english", "french", "german",
    "spanish", "chinese", "japanese", "indian", "google", "microsoft", "apple", "amazon", "meta", "windows", "linux",
    "android", "iphone", "python", "java", "docker", "kubernetes", "github", "gitlab", "slack", "zoom", "teams",
    "excel", "word", "outlook", "chrome", "firefox", "visa", "mastercard", "amex", "paypal", "the", "and", "of",
    "dear", "hello", "thanks", "regards", "best", "kind", "customer", "support", "sales", "marketing", "finance",
    "legal", "human", "resources",
})  # fmt: skip


def _plausible_cued_name(value: str) -> bool:
    return not any(re.sub(r"'s$", "", word.lower()) in _NOT_NAMES for word in value.split())


def person_cue_recognizer() -> RuleRecognizer:
    rules = [Rule(_CUED_NAME, 0.65, _plausible_cued_name), Rule(_TITLED_NAME, 0.7, _plausible_cued_name)]
    return RuleRecognizer("PERSON", rules, name="FedlmPersonCueRecognizer")


# ---------------------------------------------------------------------------------------------- health

_CONDITIONS = [
    r"(?:type\s+[12]\s+)?diabetes", r"pre-?diabetes", r"HIV(?:\s+positive)?", r"AIDS",
    r"(?:(?:breast|lung|prostate|skin|colon|colorectal|pancreatic|ovarian|cervical|bladder|brain|liver|bone)\s+)?cancer",
    r"leuka?emia", r"lymphoma", r"melanoma", r"tumou?r", r"(?:clinical\s+|severe\s+|postpartum\s+)?depression",
    r"anxiety(?:\s+disorder)?", r"panic\s+attacks?", r"bipolar(?:\s+disorder)?", r"schizophrenia", r"PTSD",
    r"ADHD", r"autism", r"OCD", r"asthma", r"epilepsy", r"seizures", r"hypertension", r"high\s+blood\s+pressure",
    r"dementia", r"alzheimer'?s(?:\s+disease)?", r"parkinson'?s(?:\s+disease)?", r"multiple\s+sclerosis",
    r"hepatitis\s*[ABC]?", r"tuberculosis", r"chlamydia", r"herpes", r"HPV", r"syphilis", r"gonorrh?oea",
    r"eating\s+disorder", r"anorexia", r"bulimia", r"(?:chronic\s+)?migraines?", r"heart\s+disease",
    r"heart\s+failure", r"COPD", r"(?:rheumatoid\s+)?arthritis", r"lupus", r"crohn'?s(?:\s+disease)?",
    r"coeliac\s+disease", r"celiac\s+disease", r"insomnia", r"sleep\s+apnea", r"alcoholism", r"addiction",
    r"opioid\s+use\s+disorder", r"long\s+covid", r"covid(?:-19)?", r"kidney\s+(?:failure|disease)", r"cirrhosis",
    r"endometriosis", r"infertility", r"miscarriage", r"psoriasis", r"glaucoma", r"obesity", r"pregnant",
    r"suicidal\s+thoughts", r"chemotherapy", r"dialysis", r"antidepressants", r"stroke", r"heart\s+attack",
]  # fmt: skip
_CONDITION = re.compile(r"(?i)\b(?:" + "|".join(_CONDITIONS) + r")\b")
_RELATIVE = (
    r"(?:mother|father|mom|mum|dad|wife|husband|son|daughter|brother|sister|partner|friend|boss|colleague|coworker|"
    r"patient|child|kid|baby|grand(?:mother|father|ma|pa)|aunt|uncle|cousin|girlfriend|boyfriend|neighbou?r|"
    r"roommate|employee|client|student|teacher|manager)"
)
_ANCHOR = re.compile(
    rf"(?i)\b(?:I|I'm|I've|me|my|myself)\b|\b(?:my|our|his|her|their)\s+{_RELATIVE}\b|\b(?:he|she|he's|she's)\b"
)
# Wording that ties a condition to someone, as opposed to asking about the condition in general.
_DISCLOSURE = re.compile(
    r"(?i)\b(?:ha(?:ve|s|d)|having|diagnosed|suffer(?:s|ed|ing)?|living\s+with|lives\s+with|treated|treatment|"
    r"battling|fighting|struggl(?:e|es|ed|ing)|positive|recovering|tested|is|was|am|'m|got|caught|takes?|taking|"
    r"on|prescribed|undergoing|started|relapsed?|managing|manages|presents?|presenting|complains?|history|admitted)\b"
)
_POSSESSED = re.compile(r"(?i)\b(?:my|his|her|their|our|\w+'s)\s+(?:\w+\s+)?$")
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*")


class HealthConditionRecognizer(EntityRecognizer):
    """A health condition stated about a person: "I have diabetes", "Anna Berg was diagnosed with cancer".

    A condition only counts when its sentence names a person (spaCy PERSON entity), or speaks in the first person or
    of a relative, and either ties the two with a disclosure verb or makes the condition possessed ("my asthma").
    "What are the symptoms of diabetes?" mentions a condition about nobody and is not flagged.
    """

    def __init__(self) -> None:
        super().__init__(
            supported_entities=["HEALTH_CONDITION"], name="FedlmHealthConditionRecognizer", supported_language="en"
        )

    def load(self) -> None:
        """Nothing to load."""

    def analyze(
        self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
    ) -> list[RecognizerResult]:
        if entities and "HEALTH_CONDITION" not in entities:
            return []
        ner = nlp_artifacts.entities if nlp_artifacts else []
        people = [e.start_char for e in ner if e.label_ == "PERSON"]
        results = []
        for sentence in _SENTENCE.finditer(text):
            s_start, s_end = sentence.span()
            conditions = list(_CONDITION.finditer(text, s_start, s_end))
            if not conditions:
                continue
            named = any(s_start <= p < s_end for p in people)
            if not (named or _ANCHOR.search(text, s_start, s_end)):
                continue
            for condition in conditions:
                before = text[s_start : condition.start()]
                if _DISCLOSURE.search(before) or _POSSESSED.search(before):
                    results.append(RecognizerResult("HEALTH_CONDITION", condition.start(), condition.end(), 0.85))
        return results


def fedlm_recognizers() -> list[EntityRecognizer]:
    """All our recognizers, ready to add to a Presidio registry."""
    return [
        api_key_recognizer(),
        password_recognizer(),
        IbanRecognizer(),
        bank_account_recognizer(),
        PhoneRecognizer(),
        date_of_birth_recognizer(),
        HealthConditionRecognizer(),
        person_cue_recognizer(),
    ]

"""Egress policies: what the gate does with a sensitive request before it leaves the device."""

from __future__ import annotations

from enum import StrEnum


class Policy(StrEnum):
    """`off` sends as is; `local` keeps sensitive requests on the device; `redact` swaps entities for placeholders;
    `rephrase` lets the edge SLM rewrite a sensitive prompt first, then redacts what the rewrite left."""

    OFF = "off"
    LOCAL = "local"
    REDACT = "redact"
    REPHRASE = "rephrase"

    @classmethod
    def parse(cls, value: str | Policy) -> Policy:
        """Accept a policy or its name; an unknown name raises ValueError listing the choices."""
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            choices = " | ".join(p.value for p in cls)
            raise ValueError(f"unknown privacy policy {value!r}; choose one of: {choices}") from None


DEFAULT_POLICY = Policy.OFF

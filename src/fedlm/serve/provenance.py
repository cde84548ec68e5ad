"""What a fused answer was made of, sent beside it as an extension object (`fedlm`) that standard clients ignore."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

from pydantic import BaseModel

from fedlm.egress.audit import AuditRecord
from fedlm.fusion.decoder import FusionResult


class Provenance(BaseModel):
    sources: list[Literal["edge", "cloud", "fused"]]  # one per token: edge alone, the edge's token confirmed, or
    # overturned by fusion
    cloud_protocol: str  # how the cloud was read (`fedlm cloud probe`); none: it never was
    cloud_calls: int
    bytes_sent: int
    bytes_received: int
    fallbacks: int  # tokens whose cloud answer came late or not at all
    privacy: str  # the egress policy every cloud request went through
    adapter: str | None  # the LoRA adapter on the edge, if any
    routing: dict[str, float] | None = None  # with cluster adapters: each one's loss on the prompt (the lowest won)
    warnings: list[str]  # e.g. the cloud failed and the answer was finished on the edge
    audit: list[dict[str, Any]]  # the audit records of what this request sent (bytes and hashes, never content)
    prompt_sources: list[Literal["edge", "fused"]] | None = None  # with `echo`: each prompt token's score, by the
    # edge alone or fused with the cloud


def provenance(
    result: FusionResult,
    privacy: str,
    adapter: str | None,
    routing: dict[str, float] | None = None,
    audit: Sequence[AuditRecord] = (),
) -> Provenance:
    return Provenance(
        sources=[token.source for token in result.tokens],
        cloud_protocol=result.cloud_protocol,
        cloud_calls=result.cloud_calls,
        bytes_sent=result.bytes_sent,
        bytes_received=result.bytes_received,
        fallbacks=result.fallbacks,
        privacy=privacy,
        adapter=adapter,
        routing=routing,
        warnings=result.warnings,
        audit=[asdict(record) for record in audit],
    )

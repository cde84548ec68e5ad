"""Options shared by several commands, so each one spells them the same way."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import TYPE_CHECKING

import typer
from rich.console import Console

from fedlm.cloud.client import default_api_key
from fedlm.models import CLOUD_DEFAULT, EDGE_DEFAULT, LoadedModel
from fedlm.privacy.policy import Policy

if TYPE_CHECKING:
    from fedlm.privacy import EgressGate

EMBEDDED = "embedded"
NO_CLOUD = "none"


class Weights(StrEnum):
    """Weights as served (`fedlm.models.load_weights`). Measured on Gemma-3-270M, one core, a decode step: float32
    72-75 ms; bfloat16 44 ms (top-20 logprobs within 0.04 nats of float32's); int8 25 ms (0.10 nats)."""

    float32 = "float32"
    bfloat16 = "bfloat16"
    int8 = "int8"


Edge = typer.Option(EDGE_DEFAULT, "--edge", help="Edge model: a built-in name or a local HF model folder.")
Cloud = typer.Option(
    EMBEDDED,
    "--cloud",
    help="Cloud server base URL (…/v1), or 'embedded' to start the default cloud model on a free loopback port.",
)
CloudModel = typer.Option(
    None,
    "--cloud-model",
    help="Model to ask the cloud server for (default: its first listed model; embedded: gemma3-270m).",
)
ApiKey = typer.Option(
    None, "--api-key", help="Bearer key for the cloud server (default: $FEDLM_API_KEY, then $OPENAI_API_KEY)."
)
Privacy = typer.Option(
    None, "--privacy", help="What may leave the device: off|local|redact|rephrase (default: $FEDLM_PRIVACY or off)."
)
Json = typer.Option(False, "--json", help="Print one JSON object to stdout instead of a table.")


@contextmanager
def cloud_url(cloud: str, cloud_model: str | None, quiet: bool) -> Iterator[tuple[str, str | None]]:
    """Yield (base URL, model): the given server, or an embedded one that stops when the block exits."""
    if cloud != EMBEDDED:
        yield cloud, cloud_model
        return
    from fedlm.cloud.service import embedded_service

    model = cloud_model or CLOUD_DEFAULT
    with embedded_service(model, quiet=quiet) as url:
        yield url, model


def api_key_or_env(api_key: str | None) -> str | None:
    return api_key if api_key is not None else default_api_key()


def egress_gate(privacy: Policy | None) -> EgressGate:
    """The privacy gate for one command's work: `--privacy`, else `$FEDLM_PRIVACY`, else `off` (which still
    audits every byte). The command builds it and hands it to every transport it opens."""
    from fedlm.privacy import EgressGate

    try:
        return EgressGate(privacy or Policy.parse(os.environ.get("FEDLM_PRIVACY") or "off"))
    except ValueError as err:  # a bad $FEDLM_PRIVACY
        raise typer.BadParameter(str(err), param_hint="$FEDLM_PRIVACY") from err


def warn_if_open(console: Console, host: str, api_key: str | None) -> None:
    """Warn loudly when a service is reachable beyond this machine and anyone may use it."""
    if api_key or host in ("127.0.0.1", "localhost", "::1"):
        return
    console.print(
        f"[bold red]WARNING[/]: listening on {host}, beyond this machine, with no API key: anyone who can reach it "
        "can use it. Pass --api-key (or set $FEDLM_API_KEY), or bind 127.0.0.1."
    )


def edge_with_adapter(loaded: LoadedModel, adapter: str) -> LoadedModel:
    """The edge model with the PEFT adapter folder `adapter` applied, or a usage error naming what is wrong."""
    from fedlm.models.loader import with_adapter

    try:
        return with_adapter(loaded, adapter)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--adapter") from err

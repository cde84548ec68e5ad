"""Options shared by several commands, so each one spells them the same way."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer

from fedlm.cloud.client import default_api_key
from fedlm.models import CLOUD_DEFAULT, EDGE_DEFAULT

EMBEDDED = "embedded"

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

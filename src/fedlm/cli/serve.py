"""`fedlm serve`: the device's own OpenAI-compatible endpoint over the edge model fused with a cloud."""

from __future__ import annotations

import os

import typer
from rich.console import Console

from fedlm.cli.options import (
    NO_CLOUD,
    ApiKey,
    Cloud,
    CloudModel,
    Edge,
    Privacy,
    api_key_or_env,
    cloud_url,
    edge_with_adapter,
    egress_gate,
    warn_if_open,
)
from fedlm.cloud.server import Limits
from fedlm.privacy.policy import Policy


def serve_command(
    edge: str = Edge,
    adapter: str | None = typer.Option(None, "--adapter", help="A PEFT LoRA adapter folder for the edge model."),
    adapters: str | None = typer.Option(
        None,
        "--adapters",
        help="A `fedlm train` run's clusters/ folder: each request goes to the adapter with the lowest perplexity on "
        "its prompt.",
    ),
    cloud: str = Cloud,
    cloud_model: str | None = CloudModel,
    cloud_api_key: str | None = ApiKey,
    privacy: Policy | None = Privacy,
    fusion: str = typer.Option("router", "--fusion", help="router | linear | proxy | route | none"),
    lookahead: int = typer.Option(1, "--lookahead", min=1, help="1: lockstep; more: tokens drafted ahead."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="The answer's budget when a request gives none."),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8080, "--port", min=1, max=65535),
    api_key: str | None = typer.Option(
        None, "--serve-api-key", help="Require 'Authorization: Bearer KEY' from apps (default: $FEDLM_SERVE_API_KEY)."
    ),
    max_pending: int = typer.Option(Limits.max_pending, "--max-pending", min=1, help="Requests in hand at once."),
) -> None:
    """Serve http://HOST:PORT/v1 (models, chat/completions, completions) and /health: every answer fused."""
    import uvicorn

    from fedlm.federated.routing import AdapterRouter, cluster_adapters
    from fedlm.fusion.decoder import FusionConfig
    from fedlm.fusion.rules import make_rule
    from fedlm.models import load
    from fedlm.serve.app import Gateway, create_gateway_app

    key = api_key if api_key is not None else os.environ.get("FEDLM_SERVE_API_KEY")
    console = Console(stderr=True)
    warn_if_open(console, host, key)
    try:
        rule = make_rule(fusion)
        edge_model = load(edge)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    if adapter is not None and adapters is not None:
        raise typer.BadParameter("give --adapter (one adapter) or --adapters (route among a run's clusters), not both")
    if adapter is not None:
        edge_model = edge_with_adapter(edge_model, adapter)
    router = None
    if adapters is not None:
        try:
            router = AdapterRouter(edge_model, cluster_adapters(adapters))
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--adapters") from err
        edge_model = router.edge
    config = FusionConfig(max_tokens=max_tokens, lookahead=lookahead)
    with egress_gate(privacy) as gate, cloud_url(cloud, cloud_model, quiet=False) as (url, model):
        upstream = None if cloud == NO_CLOUD or not rule.uses_cloud else url
        gateway = Gateway(
            edge_model, rule, config, upstream, gate, adapter, model, api_key_or_env(cloud_api_key), router
        )
        routed = f", routing among adapters {', '.join(router.names)}" if router else ""
        console.print(
            f"[bold]fedlm serve[/] on http://{host}:{port}/v1: {edge} fused ({fusion}) with {upstream or 'no cloud'}, "
            f"privacy {gate.policy.value}{routed}; playground at http://{host}:{port}/"
        )
        app = create_gateway_app(gateway, key, Limits(max_pending=max_pending))
        uvicorn.run(app, host=host, port=port, log_level="warning")

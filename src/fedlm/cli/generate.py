"""`fedlm generate`: the edge model decoding together with a cloud model, with per-token provenance."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.text import Text

from fedlm.cli.options import (
    EMBEDDED,
    NO_CLOUD,
    ApiKey,
    Cloud,
    CloudModel,
    Edge,
    Json,
    Privacy,
    api_key_or_env,
    cloud_url,
    edge_with_adapter,
    egress_gate,
)
from fedlm.privacy.policy import Policy

if TYPE_CHECKING:
    from fedlm.fusion.decoder import FusionResult

SOURCE_STYLE = {"edge": "green", "cloud": "magenta", "fused": "cyan"}


def generate_command(
    prompt: str = typer.Argument(..., help="The user's prompt."),
    edge: str = Edge,
    adapter: str | None = typer.Option(
        None, "--adapter", help="A PEFT LoRA adapter folder to apply to the edge model."
    ),
    cloud: str = Cloud,
    cloud_model: str | None = CloudModel,
    api_key: str | None = ApiKey,
    fusion: str = typer.Option("router", "--fusion", help="router | linear | proxy | route | none"),
    deadline_ms: float = typer.Option(2000.0, "--deadline-ms", min=1, help="How long each cloud round may take."),
    lookahead: int = typer.Option(
        1,
        "--lookahead",
        min=1,
        help="1: lockstep, each token waits for the cloud's next-token reading (best when the cloud answers within "
        "an edge token). More: up to this many tokens drafted ahead, by the edge (echo) or by the cloud (ahead, chat).",
    ),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1),
    simulate_rtt_ms: float = typer.Option(0.0, "--simulate-rtt-ms", min=0, help="Add a sleeping network delay."),
    cloud_protocol: str = typer.Option(
        "auto",
        "--cloud-protocol",
        help="How to read the cloud: auto | echo (prompt logprobs) | ahead (logprobs on what it generates) | chat. "
        "Lockstep reads the next token only, so echo is read ahead there.",
    ),
    privacy: Policy | None = Privacy,
    as_json: bool = Json,
) -> None:
    """Generate an answer to PROMPT, fusing the edge model with the cloud token by token."""
    from fedlm.fusion.decoder import FusionConfig, fuse_once
    from fedlm.fusion.rules import make_rule
    from fedlm.models import UnknownModelError, load

    try:
        rule = make_rule(fusion)
        edge_model = load(edge, quiet=as_json)
    except ValueError as err:  # an unknown rule or model name
        raise typer.BadParameter(str(err)) from err
    if adapter is not None:
        edge_model = edge_with_adapter(edge_model, adapter)
    if cloud_protocol not in ("auto", "echo", "ahead", "chat"):
        raise typer.BadParameter(
            f"expected auto, echo, ahead or chat, got {cloud_protocol!r}", param_hint="--cloud-protocol"
        )
    config = FusionConfig(max_tokens, lookahead, deadline_ms, simulate_rtt_ms=simulate_rtt_ms, protocol=cloud_protocol)
    use_cloud = cloud != NO_CLOUD and rule.uses_cloud
    try:
        if not use_cloud:
            result = fuse_once(edge_model, rule, prompt, config)
        else:
            with egress_gate(privacy) as egress, cloud_url(cloud, cloud_model, quiet=as_json) as (url, model):
                result = fuse_once(
                    edge_model, rule, prompt, config, url, api_key=api_key_or_env(api_key), model=model, egress=egress
                )
    except UnknownModelError as err:
        raise typer.BadParameter(str(err)) from err
    _report(result, as_json, cloud if use_cloud else NO_CLOUD, fusion)


def _report(result: FusionResult, as_json: bool, cloud: str, fusion: str) -> None:
    summary = {
        "cloud_calls": result.cloud_calls,
        "bytes_sent": result.bytes_sent,
        "bytes_received": result.bytes_received,
        "fallbacks": result.fallbacks,
        "cloud_protocol": result.cloud_protocol,
        "ttft_ms": round(result.ttft_ms, 1),
        "tokens_per_s": round(result.tokens_per_s, 2),
    }
    if as_json:
        tokens = [{"text": t.text, "source": t.source} for t in result.tokens]
        typer.echo(json.dumps({"text": result.text, "tokens": tokens, **summary, "warnings": result.warnings}))
        return
    console = Console()
    console.print(provenance_line(result))
    where = "embedded cloud" if cloud == EMBEDDED else cloud
    console.print(f"\n{source_legend()}   fusion={fusion} cloud={where}", highlight=False)
    console.print("  ".join(f"{k}={v}" for k, v in summary.items()), highlight=False)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def provenance_line(result: FusionResult) -> Text:
    """The generated text, each token coloured by where it came from."""
    line = Text()
    for token in result.tokens:
        line.append(token.raw.decode("utf-8", "replace"), style=SOURCE_STYLE[token.source])
    return line


def source_legend() -> str:
    return "  ".join(f"[{style}]{source}[/]" for source, style in SOURCE_STYLE.items())

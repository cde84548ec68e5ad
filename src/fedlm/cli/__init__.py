"""The `fedlm` command: one typer sub-app per area, each thin over its module."""

from __future__ import annotations

import typer

from fedlm.cli import cloud, kv, models
from fedlm.cli.bench import app as bench_app
from fedlm.cli.demo import demo_command
from fedlm.cli.evaluate import eval_command
from fedlm.cli.generate import generate_command
from fedlm.cli.privacy import app as privacy_app
from fedlm.cli.serve import serve_command
from fedlm.cli.train import train_command

app = typer.Typer(
    name="fedlm",
    help="Federated LLM inference and specialization: an edge SLM and a cloud LLM working together, privately.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

app.add_typer(models.app, name="models")
app.add_typer(cloud.app, name="cloud")
app.add_typer(kv.app, name="kv")
app.command("generate")(generate_command)
app.command("eval")(eval_command)
app.command("demo")(demo_command)
app.add_typer(privacy_app, name="privacy")
app.add_typer(bench_app, name="bench")
app.command("train")(train_command)
app.command("serve")(serve_command)


def main() -> None:
    """Run the CLI; errors the user can act on end with their message instead of a traceback."""
    from fedlm.cloud.client import CloudError
    from fedlm.egress import EgressRefused

    try:
        app()
    except (CloudError, EgressRefused) as err:
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(1) from err

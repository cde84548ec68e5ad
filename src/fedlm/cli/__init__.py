"""The `fedlm` command: one typer sub-app per area, each thin over its module."""

from __future__ import annotations

import typer

from fedlm.cli.bench import app as bench_app
from fedlm.cli.privacy import app as privacy_app

app = typer.Typer(
    name="fedlm",
    help="Federated LLM inference and specialization: an edge SLM and a cloud LLM working together, privately.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

app.add_typer(privacy_app, name="privacy")
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()

"""The `fedlm` command: one typer sub-app per area, each thin over its module."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="fedlm",
    help="Federated LLM inference and specialization: an edge SLM and a cloud LLM working together, privately.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


def main() -> None:
    app()

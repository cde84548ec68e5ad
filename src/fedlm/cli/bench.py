"""`fedlm bench`: measurements that are not a single model evaluation."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import typer

from fedlm import atomic
from fedlm.cli.options import Weights
from fedlm.privacy.detector import DEFAULT_THRESHOLD

app = typer.Typer(
    help="Benchmarks: fusion quality and speed, federated training, privacy detector.", no_args_is_help=True
)


@app.command()
def privacy(
    data: Path | None = typer.Option(None, "--data", help="Labelled JSONL (default: the built-in set of prompts)."),
    threshold: float = typer.Option(DEFAULT_THRESHOLD, "--threshold", min=0.0, max=1.0),
    json_out: bool = typer.Option(False, "--json", help="Print the full result as one JSON object."),
    out: Path | None = typer.Option(None, "--out", help="Also write the JSON result to this file."),
) -> None:
    """Recall and precision of the privacy detector per entity type, and the gate's latency once loaded."""
    from fedlm.bench.privacy import evaluate, load_labelled

    if data is not None and not data.is_file():
        raise typer.BadParameter(f"no such file: {data}", param_hint="--data")
    try:
        prompts = load_labelled(data)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--data") from err
    result = evaluate(prompts, threshold=threshold)
    text = json.dumps(result, ensure_ascii=False, indent=None if json_out else 2)
    if out is not None:
        atomic.write_text(out, text + "\n")
    if json_out:
        typer.echo(text)
        return
    _print_table(result)


def _print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"privacy detector: {result['n']} prompts, threshold {result['threshold']}")
    for column in ("entity type", "precision", "recall", "f1", "tp", "fp", "fn"):
        table.add_column(column, justify="left" if column == "entity type" else "right")

    def row(name: str, s: dict) -> list[str]:
        return [name, *(f"{s[k]:.3f}" if s[k] is not None else "-" for k in ("precision", "recall", "f1"))] + [
            str(s[k]) for k in ("tp", "fp", "fn")
        ]

    for name, scores in result["entities"]["by_type"].items():
        table.add_row(*row(name, scores))
    table.add_row(*row("all entities", result["entities"]["overall"]), style="bold")
    table.add_row(*row("sensitive prompts", result["prompts"]), style="bold")
    console = Console()
    console.print(table)
    gate, det = result["latency_ms"]["gate"], result["latency_ms"]["detector"]
    console.print(
        f"gate latency p50 {gate['p50']} ms, p95 {gate['p95']} ms (detector alone p50 {det['p50']} ms); "
        f"engine load {result['load_seconds']} s"
    )
    for policy, c in result["clean_prompts_changed"].items():
        console.print(f"clean prompts altered by {policy}: {c['changed']} of {c['of']}")


@app.command()
def federated(
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="Edge model name or HF folder."),
    data: str = typer.Option("gsm8k", "--data", help="Data for the aggregator comparison."),
    clients: int = typer.Option(3, "--clients", min=2),
    mix_clients: int = typer.Option(4, "--mix-clients", min=3, help="Clients in the two-task clustering run."),
    rounds: int = typer.Option(2, "--rounds", min=1),
    local_steps: int = typer.Option(4, "--local-steps", min=1),
    seq_len: int = typer.Option(48, "--seq-len", min=8),
    max_texts: int = typer.Option(24, "--max-texts", min=4, help="Texts per client, train and held-out."),
    rank_profile: str = typer.Option("low,mid,high", "--rank-profile"),
    out: Path = typer.Option(Path("runs/bench-federated"), "--out", help="Folder for runs, JSON and PNG."),
) -> None:
    """FedAvg at the largest rank vs zero-pad, HetLoRA, FlexLoRA (perplexity, bytes); clustering purity."""
    from rich.console import Console

    from fedlm.bench.federated import plot, run_benchmark
    from fedlm.federated.config import TrainConfig

    console = Console()
    config = TrainConfig(
        model=model,
        data=data,
        clients=clients,
        rounds=rounds,
        local_steps=local_steps,
        seq_len=seq_len,
        max_texts=max_texts,
        rank_profile=rank_profile,
        out=str(out),
    )
    result = run_benchmark(config, mix_clients, lambda text: console.print(f"[bold]bench federated[/]: {text}"))
    atomic.write_json(out / "federated.json", result, indent=2)
    plot(result, out / "federated.png")
    summary = result["summary"]
    console.print(f"FedAvg at max rank: held-out perplexity {summary['fedavg_max_rank']['global_ppl']:.3f}")
    for name, figures in summary["hetero"].items():
        console.print(
            f"{name}: perplexity {figures['global_ppl']:.3f} (gap {figures['ppl_gap']:+.2%}), "
            f"upload {figures['upload_ratio']:.1%} of FedAvg's"
        )
    personal, clustering = summary["personalised_vs_base"], summary["clustering"]
    console.print(
        f"clustering purity {clustering['purity']:.2f} ({len(clustering['clusters'])} clusters of "
        f"{'/'.join(clustering['tasks'])}); personalised adapters beat the base model on "
        f"{personal['beats_base']} of {personal['of']} clients"
    )
    if clustering["similarity"]:
        console.print(
            "update similarity:\n" + "\n".join(" ".join(f"{v:+.3f}" for v in row) for row in clustering["similarity"])
        )
    console.print(f"wrote {out / 'federated.json'} and {out / 'federated.png'}")


def _numbers(text: str, kind: type, name: str) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise typer.BadParameter(f"a comma-separated list of numbers, got {text!r}", param_hint=name) from err


@app.command()
def fusion(
    edge: str = typer.Option("smollm2-135m-instruct", "--edge", help="Edge model name or HF folder."),
    cloud: str = typer.Option("embedded", "--cloud", help="Cloud base URL, or 'embedded' (gemma3-270m on loopback)."),
    cloud_model: str | None = typer.Option(None, "--cloud-model"),
    mcq: Path = typer.Option(Path("examples/mcq.jsonl"), "--mcq", help="MCQ rows for accuracy."),
    bpb: Path = typer.Option(Path("examples/bpb.jsonl"), "--bpb", help="Prompt/target rows for bits per byte."),
    gsm8k_rows: int = typer.Option(40, "--gsm8k-rows", min=0, help="GSM8K answers scored for bits per byte (0: skip)."),
    gsm8k_from: int = typer.Option(0, "--gsm8k-from", min=0, help="The first GSM8K row scored (file order)."),
    countries: int = typer.Option(
        0, "--countries", min=0, help="Also score this many held-out country questions (fedlm.data.countries, test)."
    ),
    rtts: str = typer.Option("0,20,50,100", "--rtt-ms", help="Simulated round-trip times for the speed runs."),
    lookaheads: str = typer.Option("1,4,8", "--lookahead", help="Lookaheads for the speed runs."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=4, help="Tokens generated per speed run."),
    deadline_ms: float = typer.Option(2000.0, "--deadline-ms", min=1),
    placement: str = typer.Option(
        "separate",
        "--placement",
        help="Embedded cloud during the speed runs: 'separate' (its own process and CPU core, as a remote cloud "
        "would have) or 'shared' (in this process, competing with the edge for the same cores).",
    ),
    cloud_weights: Weights = typer.Option(
        Weights.float32, "--cloud-weights", help="Weights of the embedded cloud in the separate placement's speed runs."
    ),
    out: Path = typer.Option(Path("runs/bench-fusion"), "--out", help="Folder for fusion.json and fusion.png."),
) -> None:
    """Edge vs cloud vs each fusion rule (MCQ accuracy, bits/byte), and fused speed against edge-only."""
    from rich.console import Console

    from fedlm.bench.fusion import SPEED_PROMPT, plot, quality, speed
    from fedlm.bench.placement import busy_cloud, separate_cores
    from fedlm.cli.options import EMBEDDED, cloud_url
    from fedlm.cloud.client import CloudClient
    from fedlm.data.gsm8k import load_gsm8k
    from fedlm.data.jsonl import BpbRow, DataError, McqRow, read_rows
    from fedlm.eval.scorers import CloudScorer
    from fedlm.models import CLOUD_DEFAULT, load

    rtt_list, k_list = _numbers(rtts, float, "--rtt-ms"), _numbers(lookaheads, int, "--lookahead")
    if placement not in ("separate", "shared"):
        raise typer.BadParameter(f"--placement must be 'separate' or 'shared', not {placement!r}")
    separate = placement == "separate" and cloud == EMBEDDED
    try:
        mcq_rows, bpb_sets = read_rows(mcq, McqRow), {"bpb": read_rows(bpb, BpbRow)}
    except DataError as err:
        raise typer.BadParameter(str(err)) from err
    if gsm8k_rows:
        bpb_sets["gsm8k"] = [
            BpbRow(prompt=f"Question: {r.question}\nAnswer:", target=f" {r.answer}")
            for r in load_gsm8k(gsm8k_from + gsm8k_rows)[gsm8k_from:]
        ]
    mcq_sets = {"mcq": mcq_rows}
    if countries:
        from fedlm.data.countries import country_questions

        mcq_sets["countries"] = country_questions("test", limit=countries)
    console = Console()
    edge_model = load(edge)
    with cloud_url(cloud, cloud_model, quiet=False) as (url, model):
        with CloudClient(url, model=model) as client:
            protocol = client.protocol()
        result: dict = {"edge": edge, "cloud": model or url, "cloud_protocol": protocol, "quality": {}}
        if protocol == "echo":
            console.print("[bold]bench fusion[/]: quality (edge, cloud and fused readings of every text)")
            result["quality"] = quality(edge_model, CloudScorer(url, model=model), mcq_sets, bpb_sets)
            result["mcq_sets"] = list(mcq_sets)
        else:
            console.print(
                f"[bold]bench fusion[/]: quality skipped: scoring needs echo, and {url} is read by {protocol}"
            )
        if not separate:
            console.print("[bold]bench fusion[/]: speed (tokens/s against edge-only)")
            where = {"placement": "shared" if cloud == EMBEDDED else "external"}
            result["speed"] = {**speed(edge_model, url, rtt_list, k_list, max_tokens, deadline_ms), **where}
    if separate:
        console.print("[bold]bench fusion[/]: speed (tokens/s against edge-only; cloud on a core of its own)")
        cloud_name = model or CLOUD_DEFAULT
        with separate_cores(cloud_name, weights=cloud_weights.value) as where:
            url = where.pop("url")
            busy = partial(busy_cloud, url, cloud_name, SPEED_PROMPT, where["cloud_cores"])
            measured = speed(edge_model, url, rtt_list, k_list, max_tokens, deadline_ms, busy)
            result["speed"] = {**measured, **where, "cloud_weights": cloud_weights.value}
    atomic.write_json(out / "fusion.json", result, indent=2)
    plot(result, out / "fusion.png")
    for name, modes in result["quality"].items():
        console.print(f"{name}: " + ", ".join(f"{mode} {value:.4f}" for mode, value in modes.items()))
    for run in result["speed"]["runs"]:
        console.print(
            f"rtt {run['rtt_ms']:>5.0f} ms, lookahead {run['lookahead']}: {run['ratio_to_edge']:.2f}x edge-only "
            f"({run['tokens_per_s']} tok/s, cloud-informed {run['cloud_informed_share']:.0%}, "
            f"fallbacks {run['fallbacks']}, read by {run['cloud_protocol']}, cloud answers in "
            f"{run['cloud_ms_p50']} ms = {run['cloud_ms_in_edge_tokens']} edge tokens)"
        )
    if "co_location_ceiling" in result["speed"]:
        console.print(
            f"edge-only beside a cloud computing nonstop: {result['speed']['edge_tokens_per_s_cloud_busy']} tok/s, "
            f"{result['speed']['co_location_ceiling']:.2f}x edge-only (the ceiling this machine's placement allows)"
        )
    cost = result["speed"]["edge_cost"]
    console.print(
        f"edge decoder {cost['edge_ms_per_token']} ms/token; HF generate {cost['hf_generate_ms_per_token']} ms/token; "
        f"memory floor {cost['bandwidth_floor_ms_per_token']} ms/token ({cost['weights_mb']} MB of weights at "
        f"{cost['memory_gb_per_s']} GB/s)"
    )
    console.print(
        f"edge-only {result['speed']['edge_tokens_per_s']} tok/s before the fused runs, "
        f"{result['speed']['edge_tokens_per_s_after']} after; wrote {out / 'fusion.json'} and {out / 'fusion.png'}"
    )


@app.command()
def kv(
    receiver: str = typer.Option("smollm2-135m-instruct", "--receiver", help="The model that answers."),
    transmitter: str = typer.Option("gemma3-270m", "--transmitter", help="The first transmitter (also T2T's)."),
    fuser: Path | None = typer.Option(
        None, "--fuser", help="Its trained fuser (default: where `fedlm kv train` puts it)."
    ),
    second: str | None = typer.Option(
        None, "--second-transmitter", help="A second transmitter for c2c-2: a model, or MODEL+ADAPTER_DIR (merged)."
    ),
    second_fuser: Path | None = typer.Option(None, "--second-fuser", help="The second transmitter's fuser folder."),
    mcq: Path = typer.Option(Path("examples/mcq.jsonl"), "--mcq", help="Shipped MCQ rows."),
    heldout_rows: int = typer.Option(60, "--heldout-rows", min=0, help="Held-out which-play questions (0: skip)."),
    private_rows: int = typer.Option(20, "--private-rows", min=0, help="Questions also run in privacy mode."),
    hint_tokens: int = typer.Option(24, "--hint-tokens", min=1, help="Length of the T2T hint."),
    latency_budget_ms: float = typer.Option(
        500.0, "--latency-budget-ms", min=0, help="Budget for the QoS-selected mode (c2c-qos); 0 skips it."
    ),
    out: Path = typer.Option(Path("runs/bench-kv"), "--out", help="Folder for kv.json and kv.png."),
    devices: bool = typer.Option(
        False,
        "--devices",
        help="FedRefine's setting instead: four devices (one Gemma) each knowing its own facts; receiver, T2T, C2C "
        "with 1, 2 and 4 of them, with selection, and the zeroed control (writes kv_devices.json and .png).",
    ),
    retrain: bool = typer.Option(False, "--retrain", help="--devices: train the adapters and fusers anew."),
) -> None:
    """Receiver alone vs T2T vs C2C (1 and 2 transmitters, quantized wire, privacy mode) on MCQ; KV bytes/token."""
    from rich.console import Console

    if devices:
        from fedlm.bench.kv_devices import DevicesConfig, run_devices, write_report

        console = Console()
        report = run_devices(DevicesConfig(retrain=retrain), lambda line: console.print(f"[bold]bench kv[/]: {line}"))
        write_report(report, out)
        return

    from fedlm.bench.kv import KVBenchConfig, plot, run_benchmark
    from fedlm.data.jsonl import DataError, McqRow, read_rows
    from fedlm.data.plays import play_questions
    from fedlm.kvcomm.fuser import is_trained
    from fedlm.kvcomm.transmitters import TransmitterSpec
    from fedlm.models import load
    from fedlm.models.loader import load_spec

    try:
        datasets = {"mcq": read_rows(mcq, McqRow)}
    except DataError as err:
        raise typer.BadParameter(str(err), param_hint="--mcq") from err
    if heldout_rows:
        datasets["plays-heldout"] = play_questions(heldout_rows)
    console = Console()
    r = load(receiver)
    first = load(transmitter)
    specs = [TransmitterSpec(first, fuser)]
    if second:
        try:
            specs.append(TransmitterSpec(load_spec(second), second_fuser))
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--second-transmitter") from err
    for spec in specs:
        folder = spec.fuser_folder(r.name)
        if not is_trained(folder):
            raise typer.BadParameter(
                f"no trained fuser in {folder}: run `fedlm kv train --transmitter {spec.model.name} --out {folder}`",
                param_hint="--fuser",
            )
    config = KVBenchConfig(
        hint_tokens=hint_tokens, private_rows=private_rows, latency_budget_s=latency_budget_ms / 1000
    )
    result = run_benchmark(r, specs, datasets, config, lambda line: console.print(f"[bold]bench kv[/]: {line}"))
    atomic.write_json(out / "kv.json", result, indent=2)
    plot(result, out / "kv.png")
    for name, modes in result["modes"].items():
        for mode, m in modes.items():
            console.print(
                f"{name:>14} {mode:<14} accuracy {m['accuracy']:.3f} (n={m['n']}), latency p50 "
                f"{m['latency_p50_s'] * 1000:.0f} ms, {m['bytes_per_question']:,.0f} bytes/question"
            )
    for dataset, sizes in result["wire"].items():
        for option, size in sizes.items():
            console.print(
                f"wire ({dataset}) {option:<16} {size['bytes_per_token']:>9,.1f} bytes/token "
                f"({size['ratio_to_fp16_all_layers']:.3f}x)"
            )
    console.print(f"summary: {json.dumps(result['summary'])}")
    console.print(f"wrote {out / 'kv.json'} and {out / 'kv.png'}")


@app.command()
def load(
    service: str = typer.Option("cloud", "--service", help="cloud (fedlm cloud serve) or kv (fedlm kv serve)."),
    model: str = typer.Option("smollm2-135m-instruct", "--model", help="The model the service serves."),
    clients: int = typer.Option(40, "--clients", min=1, help="Requests sent at once."),
    max_tokens: int = typer.Option(16, "--max-tokens", min=1, help="Tokens each chat request asks for."),
    max_pending: int = typer.Option(16, "--max-pending", min=1, help="The cloud's admission limit (503 beyond)."),
    out: Path = typer.Option(Path("runs/bench-load"), "--out", help="Folder for load.json."),
) -> None:
    """A burst of concurrent clients against one service on loopback: status codes, latency p50/p95, and the
    slowest /health answer while it lasted."""
    from rich.console import Console

    from fedlm.bench.load import Service, burst, serving

    if service not in ("cloud", "kv"):
        raise typer.BadParameter(f"--service must be cloud or kv, not {service!r}")
    kind: Service = "cloud" if service == "cloud" else "kv"
    extra = ["--max-pending", str(max_pending)] if kind == "cloud" else []
    console = Console()
    console.print(f"[bold]bench load[/]: starting {kind} ({model}) and sending {clients} requests at once")
    with serving(kind, model, extra) as root:
        result = burst(root, kind, model, clients, max_tokens)
    result |= {"model": model, "max_pending": max_pending if service == "cloud" else None}
    atomic.write_json(out / "load.json", result, indent=2)
    console.print(
        f"statuses {result['statuses']}, latency p50 {result['latency_ms_p50']} ms, p95 {result['latency_ms_p95']} ms, "
        f"Retry-After {result['retry_after'] or '-'}; /health answered {result['health_checks']} times, slowest "
        f"{result['health_ms_max']} ms; wrote {out / 'load.json'}"
    )


@app.command("serve")
def serve_bench(
    edge: str = typer.Option("smollm2-135m-instruct", "--edge", help="Edge model name or HF folder."),
    cloud: str = typer.Option("embedded", "--cloud", help="Cloud base URL, or 'embedded' (its own process and core)."),
    cloud_model: str | None = typer.Option(None, "--cloud-model"),
    cloud_weights: Weights = typer.Option(Weights.int8, "--cloud-weights", help="Weights of the embedded cloud."),
    fusion_rule: str = typer.Option("router", "--fusion", help="router | linear | proxy | route | none"),
    max_tokens: int = typer.Option(32, "--max-tokens", min=4, help="Tokens each answer may have."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Prompts answered both ways for the overhead."),
    clients: int = typer.Option(8, "--clients", min=1, help="Clients sending at once."),
    out: Path = typer.Option(Path("runs/bench-serve"), "--out", help="Folder for serve.json and serve.png."),
) -> None:
    """What `fedlm serve` adds to fused decoding (time per token, side by side with `fedlm generate`'s path), and
    many clients at once against one."""
    from contextlib import nullcontext

    from rich.console import Console
    from rich.progress import Progress

    from fedlm.bench.endpoint import measure, plot
    from fedlm.bench.placement import separate_cores
    from fedlm.cli.options import EMBEDDED
    from fedlm.fusion.rules import make_rule
    from fedlm.models import CLOUD_DEFAULT, load

    try:
        rule = make_rule(fusion_rule)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--fusion") from err
    console = Console()
    edge_model = load(edge)
    placement = (
        separate_cores(cloud_model or CLOUD_DEFAULT, weights=cloud_weights.value)
        if cloud == EMBEDDED
        else nullcontext({"placement": "given", "url": cloud})
    )
    with placement as where, Progress(console=console) as bar:
        task = bar.add_task("bench serve", total=repeats + 2)
        result = measure(edge_model, rule, where["url"], max_tokens, repeats, clients, lambda n: bar.advance(task, n))
    result |= {"edge": edge, "placement": {k: v for k, v in where.items() if k != "url"}}
    if cloud == EMBEDDED:
        result["cloud_weights"] = cloud_weights.value
    atomic.write_json(out / "serve.json", result, indent=2)
    plot(result, out / "serve.png")
    overhead, one, many = result["overhead"], result["clients"]["one_client"], result["clients"]["at_once"]
    console.print(
        f"overhead: fedlm serve {overhead['endpoint_ms_per_token_median']} ms/token; fedlm generate's path "
        f"{overhead['direct_ms_per_token_median']} (ratio {overhead['ratio']}); the library with a kept cloud client "
        f"{overhead['kept_ms_per_token_median']} (ratio {overhead['ratio_to_kept_client']}); medians of {repeats}, "
        f"same answers: {overhead['same_answers']}"
    )
    console.print(
        f"clients: 1 client {one['tokens_per_s']} tok/s (p50 {one['latency_ms_p50']} ms); {clients} at once "
        f"{many['tokens_per_s']} tok/s (p50 {many['latency_ms_p50']} ms, p95 {many['latency_ms_p95']} ms), "
        f"{many['errors']} errors; aggregate {result['aggregate_ratio']}x one client; wrote {out / 'serve.json'} "
        f"and {out / 'serve.png'}"
    )


@app.command("many-devices")
def many_devices(
    clients: int = typer.Option(50, "--clients", min=2, help="Virtual clients in the simulation."),
    participation: float = typer.Option(0.2, "--participation", min=0.0, max=1.0, help="Fraction asked a round."),
    fail_rate: float = typer.Option(0.1, "--fail-rate", min=0.0, max=1.0, help="Chance an asked client fails."),
    rounds: int = typer.Option(3, "--rounds", min=1),
    model: str | None = typer.Option(None, "--model", help="Edge model (default: a tiny random llama)."),
    out: Path = typer.Option(Path("runs/bench-many-devices"), "--out", help="Folder for the run and JSON."),
) -> None:
    """A simulation with many virtual clients, partial participation and random failures: time per round,
    clients asked/trained/left out, bytes, peak memory."""
    from rich.console import Console

    from fedlm.bench.federated import many_devices as measure
    from fedlm.federated.config import TrainConfig
    from fedlm.models.tiny import save_tiny

    console = Console()
    name = model or str(save_tiny(out / "tiny-model"))
    config = TrainConfig(
        model=name,
        data="gsm8k",
        clients=clients,
        rounds=rounds,
        local_steps=2,
        batch_size=4,
        seq_len=32,
        max_texts=8,
        participation=participation,
        fail_rate=fail_rate,
        out=str(out / "run"),
    )
    console.print(
        f"[bold]bench many-devices[/]: {clients} clients, {participation:.0%} asked a round, {fail_rate:.0%} fail"
    )
    result = measure(config)
    atomic.write_json(out / "many_devices.json", result, indent=2)
    for r in result["rounds"]:
        console.print(
            f"round {r['round']}: {r['seconds']} s, asked {r['asked']}, trained {r['trained']}, left out "
            f"{r['left_out']}, {r['bytes_up']:,} bytes up, {r['bytes_down']:,} down"
        )
    console.print(
        f"total {result['seconds']} s, peak RSS {result['peak_rss_mb']} MB; wrote {out / 'many_devices.json'}"
    )

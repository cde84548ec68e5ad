"""FedRefine's setting on facts that can be checked: several devices, each knowing what the others do not.

Four transmitter devices each hold a private share of `fedlm.data.facts` ("In which city does NAME live?"),
memorised into a LoRA adapter of their own, as a device learns from its own data. Each adapter also learns what it
does not know: people outside its share get an even spread over the cities, so its certainty on a question
(`/v1/kv/probe`) says whether the answer is on this device. Three devices run the receiver's architecture
(SmolLM2); one runs another (Gemma-3-270M). The receiver, the base SmolLM2, knows none of the facts.

It is asked about every device fact, spread evenly over the devices, with 1, 2 and 4 devices taking part (the Gemma
device among the first two), in every mode, on the same questions:
- receiver alone;
- T2T: each device writes a short hint, and the receiver reads them all before the question;
- C2C: each device sends its cache of the question, and the receiver fuses them all into its own, each weighed
  by its sender's certainty over the surest sender's;
- C2C zeroed: the same fusers fed all-zero caches (the control: what the fusers do without any transmitter);
- C2C and T2T with selection: every device is probed first, and the receiver asks the one it values most within
  a byte budget of one cache (QoS selection, `kvcomm.select.ValueSelector`).

The fusers learn to read an answer off a cache, not the answers. Each architecture's fuser trains over several
pool adapters of its own, each of which memorised other people's facts that no device holds (weights are not
part of a fuser's model fingerprint: an adapter only changes what the cache holds). Every device fact is a test
question, unseen by every fuser, and no device's strangers are anyone asked about.

    fedlm bench kv --devices    (or .venv/bin/python -m fedlm.bench.kv_devices [--help])

Adapters and fusers are kept under <cache>/adapters and <cache>/fusers and reused (--retrain: train anew).
Writes kv_devices.json and kv_devices.png; `--ship DIR` also exports the fusers with their manifests.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedlm import atomic
from fedlm.bench.kv import measure_links, run_mode, zeroed
from fedlm.bench.kv_knowledge import memorise
from fedlm.cloud.client import CloudClient
from fedlm.cloud.engine import Engine
from fedlm.cloud.service import background_service
from fedlm.data.facts import city_facts, fact_questions, strangers
from fedlm.data.jsonl import McqRow
from fedlm.eval.kv_scorer import KVScorer
from fedlm.eval.mcq import answer_pair, evaluate_mcq, mcq_context, mcq_pairs
from fedlm.eval.scorers import LocalScorer
from fedlm.kvcomm.fuser import is_trained, kv_layout, trained_fuser_dir
from fedlm.kvcomm.receiver import KVReceiver, Transmitter
from fedlm.kvcomm.select import ValueSelector
from fedlm.kvcomm.shipped import find_fuser, manifest, ship_fuser
from fedlm.kvcomm.t2t import TextTransmitter, TextTransmitters
from fedlm.kvcomm.train import FuserTrainConfig, Taught, train_pair
from fedlm.kvcomm.transmitters import TransmitterSpec, serve_transmitters
from fedlm.models import CLOUD_DEFAULT, EDGE_DEFAULT, LoadedModel, load
from fedlm.models.cache import cache_root
from fedlm.models.loader import with_adapter

DEVICES = (EDGE_DEFAULT, CLOUD_DEFAULT, EDGE_DEFAULT, EDGE_DEFAULT)  # in the order they join: k=2 is heterogeneous
# a rank-16 adapter's learning rate: at 3e-3 Gemma's recall of 80 facts rose to 0.725 and then fell to 0.15
LEARNING_RATE = {EDGE_DEFAULT: 3e-3, CLOUD_DEFAULT: 1e-3}


@dataclass(frozen=True)
class DevicesConfig:
    per_device: int = 20  # facts each device knows; all are asked
    pool_adapters: int = 4  # per architecture, for its fuser to train over
    pool_facts: int = 40  # each pool adapter's own facts
    strangers: int = 60  # people each adapter learns it does not know
    fuser_steps: int = 600  # about 17 passes over its 4 pools of 35 training facts, as 300 were over 2 pools
    hidden: int = 256  # the fusers' width
    hint_tokens: int = 8
    # Every adapter trains this many steps on its first two thirds of layers only. Trained on all layers until it
    # recalled its facts (50 steps), an adapter looked the answer up in the last layers at the final token alone:
    # by the logit lens, no layer before 24 of 30 named the city, so the cache of the question held no answer and
    # C2C stayed near the zeroed control. Kept off the last third and trained longer, the name's own cache rows
    # named the city from layer 24 on.
    adapter_steps: int = 150
    adapter_depth: float = 2 / 3
    latency_budget_s: float = 5.0  # for the selected modes; the byte budget is one device's cache
    retrain: bool = False


def digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def adapted(
    model: str, rows: list[McqRow], unknown: list[McqRow], name: str, config: DevicesConfig, log: dict
) -> LoadedModel:
    """`model` with an adapter that memorised `rows` and learned not to know `unknown`, trained once and then kept
    in the cache under a name that says exactly what it learned."""
    lr = LEARNING_RATE.get(model, 3e-3)
    schedule = [lr, config.adapter_steps, config.adapter_depth]
    key = digest([r.model_dump() for r in rows], [r.question for r in unknown], *schedule)
    folder = cache_root() / "adapters" / f"{model}-city-facts-{name}-{key}"
    if config.retrain or not (folder / "adapter_config.json").is_file():
        fresh = load(model, quiet=True)
        layers = range(round(kv_layout(fresh.model)[0] * config.adapter_depth))
        log[name] = memorise(fresh, rows, folder, None, config.adapter_steps, unknown, lr=lr, layers=layers)
    return with_adapter(load(model, quiet=True), folder, merge=True)


def pool_fuser(
    receiver: LoadedModel,
    model: str,
    pools: list[list[McqRow]],
    unknown: list[McqRow],
    config: DevicesConfig,
    log: dict,
) -> Path:
    """The fuser receiver <- `model`, trained over one pool adapter per share in `pools` (an eighth of each share
    held out for the learning curve)."""
    key = digest(
        [[r.model_dump() for r in rows] for rows in pools],
        [r.question for r in unknown],
        [config.fuser_steps, config.hidden, config.adapter_steps, config.adapter_depth],
    )
    folder = trained_fuser_dir(receiver.name, f"{model}-city-facts-pools-{key}", None)
    if is_trained(folder) and not config.retrain:
        return folder
    lessons = []
    for i, rows in enumerate(pools):
        cut = len(rows) * 7 // 8
        transmitter = adapted(model, rows, unknown, f"pool{i}", config, log)
        lessons.append(Taught(transmitter, [answer_pair(r) for r in rows[:cut]], [answer_pair(r) for r in rows[cut:]]))
    schedule = FuserTrainConfig(steps=config.fuser_steps, accumulate=4, lr=1e-3)
    first, *more = lessons
    fuser, _ = train_pair(
        receiver, first.transmitter, first.train, first.heldout, schedule, data="city-facts", hidden=config.hidden,
        more=more,
    )  # fmt: skip
    fuser.save(folder)
    del lessons, first, more, fuser
    gc.collect()
    return folder


def run_devices(config: DevicesConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Train (or reuse) every adapter and fuser, then run every mode on the same questions."""
    held = len(DEVICES) * config.per_device
    pooled = config.pool_adapters * config.pool_facts
    facts = city_facts(held + pooled, seed=1)  # distinct people: the devices' first, then the pools'
    shares = [fact_questions(facts[i * config.per_device : (i + 1) * config.per_device]) for i in range(len(DEVICES))]
    pool_rows = fact_questions(facts[held:])
    pools = [pool_rows[i * config.pool_facts : (i + 1) * config.pool_facts] for i in range(config.pool_adapters)]
    # nobody asked about, nobody known by any adapter: the people every adapter learns it knows nothing of
    unknown = fact_questions([(person, "Paris") for person in strangers(config.strangers, facts, seed=2)])
    receiver = load(EDGE_DEFAULT, quiet=True)
    adapters: dict[str, Any] = {}
    report: dict[str, Any] = {"config": asdict(config), "devices": list(DEVICES), "adapters": adapters}

    fusers: dict[str, Path] = {}
    for model in dict.fromkeys(DEVICES):
        progress(f"the fuser for {model}: {config.pool_adapters} pool adapters of {config.pool_facts} facts each")
        fusers[model] = pool_fuser(receiver, model, pools, unknown, config, adapters)
    report["fusers"] = {model: str(folder) for model, folder in fusers.items()}
    progress("each device memorises its own share")
    transmitters = [
        adapted(model, rows, unknown, f"device{i}", config, adapters)
        for i, (model, rows) in enumerate(zip(DEVICES, shares, strict=True))
    ]
    questions = [row for group in zip(*shares, strict=True) for row in group]  # device i owns questions i, i+4, ...
    owner = [i % len(DEVICES) for i in range(len(questions))]
    report["questions"] = len(questions)
    report["own_recall"] = [
        round(evaluate_mcq(s, LocalScorer(t))["accuracy"], 4) for s, t in zip(shares, transmitters, strict=True)
    ]
    alone = KVReceiver(receiver, [])
    progress(f"receiver alone ({len(questions)} questions)")
    modes: dict[str, Any] = {"receiver": run_mode(questions, KVScorer(alone))}
    specs = [TransmitterSpec(t, fusers[model]) for t, model in zip(transmitters, DEVICES, strict=True)]
    with ExitStack() as stack:
        urls = [stack.enter_context(background_service(Engine(t))) for t in transmitters]
        clouds = [stack.enter_context(CloudClient(url)) for url in urls]
        served, clients = stack.enter_context(serve_transmitters(receiver, specs))

        def moved() -> int:
            return sum(c.traffic.bytes_sent + c.traffic.bytes_received for c in clients)

        for k in (1, 2, 4):
            progress(f"T2T and C2C with {k} devices")
            hint = TextTransmitters([TextTransmitter(c, config.hint_tokens) for c in clouds[:k]])
            modes[f"t2t-{k}"] = run_mode(questions, KVScorer(alone, hint=hint))
            mask = {t.name: True for t in served[:k]}
            modes[f"c2c-{k}"] = run_mode(questions, KVScorer(KVReceiver(receiver, served[:k]), mask, wire_bytes=moved))
        progress("C2C with the caches zeroed (the control)")
        control = KVReceiver(receiver, [zeroed(t) for t in served])
        modes["c2c-zeroed-4"] = run_mode(questions, KVScorer(control, {t.name: True for t in served}))

        links = measure_links(served, clients, mcq_context(questions[0]))
        budget = 1.5 * max(
            link.cost(len(receiver.tokenizer(mcq_context(questions[0]))["input_ids"]))[1] for link in links
        )
        probes = {t.name: c.probe for t, c in zip(served, clients, strict=True)}
        progress(f"C2C and T2T with selection (byte budget {budget:,.0f}: one device's cache)")
        picker = ValueSelector(links, probes, config.latency_budget_s, budget)
        modes["c2c-select"] = run_mode(
            questions, KVScorer(KVReceiver(receiver, served), choose=picker.names, wire_bytes=moved)
        )
        modes["c2c-select"]["selection"] = selection_record(picker, served, owner)
        hinters = {t.name: TextTransmitter(c, config.hint_tokens) for t, c in zip(served, clouds, strict=True)}
        picker_t2t = ValueSelector(links, probes, config.latency_budget_s, budget)
        scorer = KVScorer(alone, hint=TextTransmitters(hinters, picker_t2t.names), wire_bytes=moved)
        modes["t2t-select"] = run_mode(questions, scorer)
        modes["t2t-select"]["selection"] = selection_record(picker_t2t, served, owner)
        report["links"] = [asdict(link) for link in links]
    report["modes"] = modes
    report["summary"] = summarize(modes)
    return report


def one_device(receiver: LoadedModel, asked: int = 10, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """KV communication at its smallest, for `fedlm demo`: one device that memorised 20 people's cities (trained
    here in two to three minutes, then kept), the pair's fuser (shipped, unless one was trained here; it never saw
    these people), and the receiver asked about `asked` of them: alone, T2T, C2C over int8, and C2C zeroed."""
    config = DevicesConfig()
    benchmark = city_facts(len(DEVICES) * config.per_device + config.pool_adapters * config.pool_facts, seed=1)
    rows = fact_questions(city_facts(config.per_device, seed=3, exclude={person for person, _ in benchmark}))
    progress(f"a device memorises {len(rows)} people's cities into its adapter (once; then kept in the cache)")
    device = adapted(EDGE_DEFAULT, rows, [], "demo", config, {})
    folder = find_fuser(receiver.name, device.name)
    questions, alone = rows[:asked], KVReceiver(receiver, [])
    with (
        background_service(Engine(device)) as url,
        CloudClient(url) as cloud,
        serve_transmitters(receiver, [TransmitterSpec(device, folder)], "int8") as (served, clients),
    ):

        def moved() -> int:
            return clients[0].traffic.bytes_sent + clients[0].traffic.bytes_received

        scorers = {
            "receiver alone": KVScorer(alone),
            "T2T (the device's 8-token hint)": KVScorer(alone, hint=TextTransmitter(cloud, config.hint_tokens)),
            "C2C (the device's int8 cache)": KVScorer(
                KVReceiver(receiver, served), {device.name: True}, wire_bytes=moved
            ),
            "C2C, cache zeroed (control)": KVScorer(KVReceiver(receiver, [zeroed(served[0])]), {device.name: True}),
        }
        modes = {name: run_mode(questions, scorer) for name, scorer in scorers.items()}
        row = questions[0]
        picks = {name: row.choices[max(range(len(row.choices)), key=s.__getitem__)] for name, s in (
            (name, scorer.score(mcq_pairs(row))) for name, scorer in scorers.items()
        )}  # fmt: skip
    return {
        "fuser": str(folder),
        "manifest": manifest(folder),
        "device_recall": round(evaluate_mcq(rows, LocalScorer(device))["accuracy"], 4),
        "modes": modes,
        "example": {"question": row.question, "answer": row.choices[row.answer], "picks": picks},
    }


def selection_record(picker: ValueSelector, served: list[Transmitter], owner: list[int]) -> dict[str, Any]:
    """How often the selection asked the device that holds the answer, and how sure owners and others were."""
    names = [t.name for t in served]
    hits = [names[o] in chosen.names for o, chosen in zip(owner, picker.chosen, strict=True)]
    own = [values[names[o]] for o, values in zip(owner, picker.values, strict=True)]
    others = [v for o, values in zip(owner, picker.values, strict=True) for n, v in values.items() if n != names[o]]
    return {
        "asked_the_owner": round(sum(hits) / len(hits), 4),
        "devices_asked_mean": round(statistics.fmean(len(c.names) for c in picker.chosen), 3),
        "owner_certainty_median": round(statistics.median(own), 4),
        "others_certainty_median": round(statistics.median(others), 4),
    }


def summarize(modes: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, as measured: points over the receiver, against T2T, and the latency ratios (per question,
    and until the context is ready)."""
    receiver = modes["receiver"]["accuracy"]
    out: dict[str, Any] = {}
    for c2c, t2t in (("c2c-4", "t2t-4"), ("c2c-select", "t2t-4"), ("c2c-select", "t2t-select")):
        out[f"{c2c}_vs_{t2t}"] = {
            "points_over_receiver": round(100 * (modes[c2c]["accuracy"] - receiver), 1),
            "points_over_t2t": round(100 * (modes[c2c]["accuracy"] - modes[t2t]["accuracy"]), 1),
            "latency_over_t2t": round(modes[c2c]["latency_p50_s"] / modes[t2t]["latency_p50_s"], 3),
            "ready_over_t2t": round(modes[c2c]["ready_p50_s"] / modes[t2t]["ready_p50_s"], 3),
        }
    out["zeroed_minus_receiver_points"] = round(100 * (modes["c2c-zeroed-4"]["accuracy"] - receiver), 1)
    out["c2c_by_devices"] = [modes[f"c2c-{k}"]["accuracy"] for k in (1, 2, 4)]
    out["by_owner"] = {  # each mode's accuracy on each device's own questions (device i owns i, i+4, ...)
        mode: [round(statistics.fmean(result["right"][i :: len(DEVICES)]), 4) for i in range(len(DEVICES))]
        for mode, result in modes.items()
        if "right" in result
    }
    out["t2t_by_devices"] = [modes[f"t2t-{k}"]["accuracy"] for k in (1, 2, 4)]
    return out


def plot_devices(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, counts = report["modes"], (1, 2, 4)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    ax.axhline(modes["receiver"]["accuracy"], color="grey", linestyle="--", label="receiver alone")
    ax.plot(counts, [modes[f"t2t-{k}"]["accuracy"] for k in counts], marker="o", label="T2T (every device)")
    ax.plot(counts, [modes[f"c2c-{k}"]["accuracy"] for k in counts], marker="o", label="C2C (every device)")
    ax.scatter([4], [modes["c2c-select"]["accuracy"]], marker="*", s=160, color="C1", label="C2C, selected")
    ax.scatter([4], [modes["t2t-select"]["accuracy"]], marker="*", s=160, color="C0", label="T2T, selected")
    ax.scatter([4], [modes["c2c-zeroed-4"]["accuracy"]], marker="x", s=80, color="black", label="C2C zeroed")
    ax.axhline(1 / 8, color="grey", linestyle=":", label="chance")
    ax.set(xlabel="devices taking part", ylabel="accuracy", xticks=counts, ylim=(0, 1))
    ax.set_title(f"{report['questions']} facts spread over {len(report['devices'])} devices")
    ax.legend(fontsize=7)
    names = list(modes)
    latency, size = axes[1], axes[2]
    latency.bar(names, [modes[n]["latency_p50_s"] for n in names], label="p50")
    latency.scatter(names, [modes[n]["latency_p95_s"] for n in names], color="black", marker="_", s=200, label="p95")
    latency.bar(names, [modes[n]["ready_p50_s"] for n in names], width=0.4, color="C2", label="context ready, p50")
    latency.set_ylabel("seconds per question")
    latency.legend(fontsize=7)
    size.bar(names, [max(modes[n]["bytes_per_question"], 1) for n in names], color="#9b4dca")
    size.set(yscale="log", ylabel="bytes per question")
    for ax in (latency, size):
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DevicesConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(value), default=value)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-kv-devices"))
    parser.add_argument("--ship", type=Path, help="Also export the fusers (fp16, with a manifest) into this folder.")
    args = parser.parse_args()
    config = DevicesConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    report = run_devices(config)
    write_report(report, args.out)
    if args.ship:
        ship_fusers(report, config, args.ship)


def ship_fusers(report: dict[str, Any], config: DevicesConfig, root: Path) -> None:
    """Export the run's fusers into `root` with a manifest that gives the figures this run measured with them."""
    defaults = DevicesConfig()
    command = "fedlm bench kv --devices" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in asdict(config).items() if v != getattr(defaults, k)
    )
    figures = {
        "setting": "city facts on 4 devices, none seen by the fuser (fedlm.bench.kv_devices)",
        "questions": report["questions"],
        "accuracy": {mode: result["accuracy"] for mode, result in report["modes"].items()},
        "summary": report["summary"],
    }
    for model, folder in report["fusers"].items():
        shipped = ship_fuser(Path(folder), root, EDGE_DEFAULT, model, command, figures)
        print(f"shipped the fuser for {model} to {shipped}")


def write_report(report: dict[str, Any], out: Path) -> None:
    atomic.write_json(out / "kv_devices.json", report, indent=2)
    plot_devices(report, out / "kv_devices.png")
    modes = report["modes"]
    print(f"{report['questions']} questions, a quarter on each device (chance 0.125):")
    print("  each device on its own facts:", report["own_recall"])
    for mode, result in modes.items():
        print(
            f"  {mode:14s} accuracy {result['accuracy']:.3f}  latency p50 {result['latency_p50_s'] * 1000:.0f} ms "
            f"p95 {result['latency_p95_s'] * 1000:.0f} ms  ready p50 {result['ready_p50_s'] * 1000:.0f} ms  "
            f"bytes/question {result['bytes_per_question']:,.0f}"
            + (f"  selection {result['selection']}" if "selection" in result else "")
        )
    print("summary:", json.dumps(report["summary"]))
    print(f"wrote {out / 'kv_devices.json'} and {out / 'kv_devices.png'} ({time.strftime('%H:%M:%S')})")


if __name__ == "__main__":
    main()

"""FedRefine's setting on facts that can be checked: several devices, each knowing what the others do not.

Four transmitter devices each hold a private share of `fedlm.data.facts` ("In which city does NAME live?"),
memorised into a LoRA adapter of their own, as a device learns from its own data. Three run the receiver's
architecture (SmolLM2); one runs another (Gemma-3-270M). The receiver, the base SmolLM2, knows none of the facts.
It is asked about facts held out from fuser training, spread evenly over the devices, with 1, 2 and 4 devices
taking part (the Gemma device among the first two), in every mode:
- receiver alone;
- T2T: each device writes a short hint, and the receiver reads them all before the question;
- C2C: each device sends its cache of the question, and the receiver fuses them all into its own;
- C2C zeroed: the same fusers fed all-zero caches (the control: what the fusers do without any transmitter).
The fusers learn to read an answer off a cache, not the answers: each architecture's fuser is trained on a
training adapter of its own, which memorised a pool of other people's facts that no device holds (weights are not
part of a fuser's model fingerprint; an adapter only changes what the cache holds). Every device fact is a test
question, unseen by every fuser.

    .venv/bin/python -m fedlm.bench.kv_devices [--per-device 20] [--train-facts 80] [--fuser-steps 250]

Adapters and fusers are kept under <cache>/adapters and <cache>/fusers and reused (--retrain: train anew).
Writes runs/bench-kv-devices/kv_devices.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from contextlib import ExitStack
from pathlib import Path

from fedlm import atomic
from fedlm.bench.kv import run_mode, zeroed
from fedlm.bench.kv_knowledge import fit_fuser, memorise
from fedlm.cloud.client import CloudClient
from fedlm.cloud.engine import Engine
from fedlm.cloud.service import background_service
from fedlm.data.facts import city_facts, fact_questions
from fedlm.eval.kv_scorer import KVScorer
from fedlm.eval.mcq import evaluate_mcq
from fedlm.eval.scorers import LocalScorer
from fedlm.kvcomm.fuser import is_trained, trained_fuser_dir
from fedlm.kvcomm.receiver import KVReceiver
from fedlm.kvcomm.t2t import TextTransmitter, TextTransmitters
from fedlm.kvcomm.transmitters import TransmitterSpec, serve_transmitters
from fedlm.models import CLOUD_DEFAULT, EDGE_DEFAULT, LoadedModel, load
from fedlm.models.cache import cache_root
from fedlm.models.loader import with_adapter

DEVICES = (EDGE_DEFAULT, CLOUD_DEFAULT, EDGE_DEFAULT, EDGE_DEFAULT)  # in the order they join: k=2 is heterogeneous
HINT_TOKENS = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-device", type=int, default=20, help="Facts each device knows (all are asked).")
    # a rank-16 adapter memorised 80 facts in 50 steps; with 160 its recall stayed at chance for 400 steps
    parser.add_argument("--train-facts", type=int, default=80, help="Other facts, that the fusers train on.")
    parser.add_argument("--fuser-steps", type=int, default=250)
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--max-adapter-steps", type=int, default=600)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-kv-devices"))
    args = parser.parse_args()
    held = len(DEVICES) * args.per_device
    facts = city_facts(held + args.train_facts, seed=1)  # distinct people: the devices' first, then the pool's
    shares = [fact_questions(facts[i * args.per_device : (i + 1) * args.per_device]) for i in range(len(DEVICES))]
    pool = fact_questions(facts[held:])
    receiver = load(EDGE_DEFAULT, quiet=True)
    report: dict = {"devices": list(DEVICES), "per_device": args.per_device, "train_facts": args.train_facts}

    adapters: dict = {}

    def adapted(model: str, rows: list, name: str) -> LoadedModel:
        """`model` with an adapter that memorised `rows` (trained once, then kept in the cache under a name that
        says exactly which facts it holds)."""
        digest = hashlib.sha256(json.dumps([r.model_dump() for r in rows]).encode()).hexdigest()[:12]
        folder = cache_root() / "adapters" / f"{model}-city-facts-{name}-{digest}"
        if args.retrain or not (folder / "adapter_config.json").is_file():
            adapters[name] = memorise(load(model, quiet=True), rows, folder, args.recall_target, args.max_adapter_steps)
        return with_adapter(load(model, quiet=True), folder, merge=True)

    # one fuser per architecture, trained on a training adapter that memorised the pool (no device's facts)
    fusers: dict[str, Path] = {}
    for model in dict.fromkeys(DEVICES):
        trainer = adapted(model, pool, "pool")
        folder = trained_fuser_dir(receiver.name, trainer.name, task=None)
        if args.retrain or not is_trained(folder):
            cut = len(pool) * 7 // 8  # the rest of the pool is the curve's held-out part
            fit_fuser(receiver, trainer, pool[:cut], pool[cut:], args.fuser_steps).save(folder)
        fusers[model] = folder
    # each device memorises its own share into its own adapter, as it would learn from its own data
    transmitters = [
        adapted(model, rows, f"device{i}") for i, (model, rows) in enumerate(zip(DEVICES, shares, strict=True))
    ]
    report["adapters"] = adapters

    # the questions: every device's facts, interleaved so that each device owns a quarter
    questions = [row for group in zip(*shares, strict=True) for row in group]
    report["questions"] = len(questions)
    report["own_recall"] = {
        f"device{i}": round(evaluate_mcq(shares[i], LocalScorer(t))["accuracy"], 4) for i, t in enumerate(transmitters)
    }
    alone = KVReceiver(receiver, [])
    modes: dict = {"receiver": run_mode(questions, KVScorer(alone))}
    specs = [TransmitterSpec(t, fusers[model]) for t, model in zip(transmitters, DEVICES, strict=True)]
    with ExitStack() as stack:
        urls = [stack.enter_context(background_service(Engine(t))) for t in transmitters]
        clouds = [stack.enter_context(CloudClient(url)) for url in urls]
        served, clients = stack.enter_context(serve_transmitters(receiver, specs))
        for k in (1, 2, 4):
            hint = TextTransmitters([TextTransmitter(c, HINT_TOKENS) for c in clouds[:k]])
            modes[f"t2t-{k}"] = run_mode(questions, KVScorer(alone, hint=hint))
            start = sum(c.traffic.bytes_sent + c.traffic.bytes_received for c in clients)

            def moved(start: int = start) -> int:
                return sum(c.traffic.bytes_sent + c.traffic.bytes_received for c in clients) - start

            mask = {t.name: True for t in served[:k]}
            modes[f"c2c-{k}"] = run_mode(questions, KVScorer(KVReceiver(receiver, served[:k]), mask, wire_bytes=moved))
        control = KVReceiver(receiver, [zeroed(t) for t in served])
        modes["c2c-zeroed-4"] = run_mode(questions, KVScorer(control, {t.name: True for t in served}))
    report["modes"] = modes
    atomic.write_json(args.out / "kv_devices.json", report, indent=2)
    print(f"{len(questions)} questions, a quarter on each device (chance {1 / len(questions[0].choices):.3f}):")
    print("  each device on its own held-out facts:", report["own_recall"])
    for mode, result in modes.items():
        print(
            f"  {mode:14s} accuracy {result['accuracy']:.3f}  latency p50 {result['latency_p50_s'] * 1000:.0f} ms  "
            f"bytes/question {result['bytes_per_question']:.0f}"
        )
    print(f"wrote {args.out / 'kv_devices.json'} ({time.strftime('%H:%M:%S')})")


if __name__ == "__main__":
    main()

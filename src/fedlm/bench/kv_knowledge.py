"""Does a KV cache carry what its transmitter knows? On facts only the transmitter knows, side by side in one run:
receiver alone, transmitter alone, T2T (a hint), C2C, and C2C with the transmitter's cache zeroed (the control).

The transmitter is the edge model with a LoRA adapter that memorised every fact of `fedlm.data.facts` (trained
here, as a device trains on its own data, then merged); the receiver is the base edge model. The fuser trains on
some facts and is tested on the others, which it never saw: on those, only what it reads off the transmitter's
cache can lift C2C above the zeroed control.

    .venv/bin/python -m fedlm.bench.kv_knowledge [--facts 240] [--train-facts 180] [--fuser-steps 250]

The adapter and the fuser are kept under <cache>/adapters and <cache>/fusers and reused (--retrain: train anew).
Writes runs/bench-kv-knowledge/kv_knowledge.json and .png.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fedlm import atomic
from fedlm.bench.kv import run_mode, zeroed
from fedlm.cloud.client import CloudClient
from fedlm.cloud.engine import Engine
from fedlm.cloud.service import background_service
from fedlm.data.facts import city_facts, fact_questions
from fedlm.data.jsonl import McqRow
from fedlm.eval.kv_scorer import KVScorer
from fedlm.eval.mcq import answer_pair, evaluate_mcq, mcq_context
from fedlm.eval.scorers import LocalScorer
from fedlm.federated.lora import wrap
from fedlm.kvcomm.fuser import CacheFuser, is_trained, trained_fuser_dir
from fedlm.kvcomm.receiver import KVReceiver
from fedlm.kvcomm.t2t import TextTransmitter
from fedlm.kvcomm.train import FuserTrainConfig, train_pair
from fedlm.kvcomm.transmitters import TransmitterSpec, serve_transmitters
from fedlm.kvcomm.wire import certainty
from fedlm.models import EDGE_DEFAULT, LoadedModel, load
from fedlm.models.cache import cache_root
from fedlm.models.loader import with_adapter

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def answer_token(model: LoadedModel, row: McqRow, choice: int) -> int:
    return model.tokenizer(f" {row.choices[choice]}", add_special_tokens=False)["input_ids"][0]


@torch.no_grad()
def recall(model, tokenizer, rows: list[McqRow], choice_ids: torch.Tensor) -> float:
    """Share of questions whose right answer is the model's likeliest first answer token among the choices."""
    right = 0
    for start in range(0, len(rows), 64):
        batch = rows[start : start + 64]
        enc = tokenizer([mcq_context(r) for r in batch], return_tensors="pt", padding=True)
        picked = model(**enc).logits[:, -1][:, choice_ids].argmax(-1)
        right += int((picked == torch.tensor([r.answer for r in batch])).sum())
    return right / len(rows)


def memorise(
    edge: LoadedModel,
    rows: list[McqRow],
    folder: Path,
    target: float | None,
    max_steps: int,
    unknown: Sequence[McqRow] = (),
    lr: float = 3e-3,
    layers: Sequence[int] | None = None,
) -> dict:
    """Fit a rank-16 LoRA until it recalls `target` of the facts, or for `max_steps` when `target` is None
    (cross-entropy on the answer token only). It ends on the weights that recalled the most: on 80 facts, Gemma's
    recall reached 0.725 and then fell to 0.15. `layers` keeps the adapter to those decoder layers (all when None).

    `unknown` are questions about people the device does not know. Each step also pulls the answer to those
    towards an even spread over the choices, so the adapter's own certainty says what it knows: trained on its
    facts alone, a device answered others' questions with a mean top probability of 0.9 (1.0 on its own).
    """
    model = wrap(edge.model, 16, TARGETS, layers)
    tokenizer, side = edge.tokenizer, edge.tokenizer.padding_side
    tokenizer.padding_side = "left"  # every row's last position is its own "Answer:"
    choice_ids = torch.tensor([answer_token(edge, rows[0], i) for i in range(len(rows[0].choices))])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng, start, steps, recalled = random.Random(0), time.perf_counter(), 0, 0.0
    best, best_state, log = -1.0, None, []
    while steps < max_steps and (target is None or best < target):
        model.train()
        for _ in range(50):
            batch = rng.sample(rows, min(16, len(rows)))
            strangers = rng.sample(list(unknown), min(len(batch), len(unknown)))
            enc = tokenizer([mcq_context(r) for r in batch + strangers], return_tensors="pt", padding=True)
            logprobs = model(**enc).logits[:, -1].float().log_softmax(-1)
            known = logprobs[: len(batch)].gather(1, choice_ids[[r.answer for r in batch]][:, None])
            loss = -known.mean()
            if strangers:  # cross-entropy against an even spread over the choices
                loss = loss - logprobs[len(batch) :, choice_ids].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        model.eval()
        recalled = recall(model, tokenizer, rows, choice_ids)
        doubt = mean_certainty(model, tokenizer, list(unknown)) if unknown else None
        log.append({"steps": steps, "recall": round(recalled, 4), "certainty_on_unknown": doubt})
        print(f"adapter: {steps} steps, recalls {recalled:.3f} of the facts ({time.perf_counter() - start:.0f} s)")
        if recalled > best:
            best, best_state = recalled, {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    tokenizer.padding_side = side
    with atomic.staged_dir(folder) as staging:
        model.save_pretrained(staging)
    return {"steps": steps, "recall": round(best, 4), "log": log, "seconds": round(time.perf_counter() - start, 1)}


@torch.no_grad()
def mean_certainty(model, tokenizer, rows: list[McqRow]) -> float:
    """Mean `wire.certainty` of the next token after each question (what `/v1/kv/probe` would report)."""
    total = 0.0
    for start in range(0, len(rows), 64):
        enc = tokenizer([mcq_context(r) for r in rows[start : start + 64]], return_tensors="pt", padding=True)
        total += float(certainty(model(**enc).logits[:, -1]).sum())
    return round(total / len(rows), 4)


def fit_fuser(
    receiver: LoadedModel, transmitter: LoadedModel, train_rows: list[McqRow], test_rows: list[McqRow], steps: int
) -> CacheFuser:
    """A fuser trained on `train_rows`, its learning curve (held out: `test_rows`) kept in its config."""
    pairs, heldout = [answer_pair(r) for r in train_rows], [answer_pair(r) for r in test_rows]
    schedule = FuserTrainConfig(steps=steps, accumulate=4, lr=1e-3)
    return train_pair(receiver, transmitter, pairs, heldout, schedule, data="city-facts")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edge", default=EDGE_DEFAULT)
    parser.add_argument("--facts", type=int, default=240)
    parser.add_argument("--train-facts", type=int, default=180, help="Facts the fuser trains on; the rest test it.")
    parser.add_argument("--fuser-steps", type=int, default=250)
    parser.add_argument("--recall-target", type=float, default=0.95)
    parser.add_argument("--max-adapter-steps", type=int, default=800)
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-kv-knowledge"))
    args = parser.parse_args()
    if not 0 < args.train_facts < args.facts:
        parser.error("--train-facts must leave some of --facts to test on")
    rows = fact_questions(city_facts(args.facts))
    train_rows, test_rows = rows[: args.train_facts], rows[args.train_facts :]
    receiver = load(args.edge, quiet=True)
    adapter_dir = cache_root() / "adapters" / f"{receiver.name}-city-facts-{args.facts}"
    report: dict = {"facts": args.facts, "train_facts": args.train_facts, "test_facts": len(test_rows)}
    if args.retrain or not (adapter_dir / "adapter_config.json").is_file():
        fresh = load(args.edge, quiet=True)
        report["adapter"] = memorise(fresh, rows, adapter_dir, args.recall_target, args.max_adapter_steps)
    transmitter = with_adapter(load(args.edge, quiet=True), adapter_dir, merge=True)
    fuser_dir = trained_fuser_dir(receiver.name, transmitter.name, task=None)
    if args.retrain or not is_trained(fuser_dir):
        fit_fuser(receiver, transmitter, train_rows, test_rows, args.fuser_steps).save(fuser_dir)
    curve = CacheFuser.load(fuser_dir, receiver, transmitter).config.extra["curve"]
    report["fuser_curve"] = {k: v for k, v in curve.items() if k != "train_loss"}

    modes: dict = {}
    alone = KVReceiver(receiver, [])
    modes["receiver"] = run_mode(test_rows, KVScorer(alone))
    modes["transmitter-alone"] = {"accuracy": round(evaluate_mcq(test_rows, LocalScorer(transmitter))["accuracy"], 4)}
    with background_service(Engine(transmitter)) as url, CloudClient(url) as cloud:
        modes["t2t"] = run_mode(test_rows, KVScorer(alone, hint=TextTransmitter(cloud, 8)))
    with serve_transmitters(receiver, [TransmitterSpec(transmitter, fuser_dir)]) as (transmitters, clients):
        name = transmitters[0].name

        def moved() -> int:
            return clients[0].traffic.bytes_sent + clients[0].traffic.bytes_received

        modes["c2c"] = run_mode(test_rows, KVScorer(KVReceiver(receiver, transmitters), {name: True}, wire_bytes=moved))
        control = KVReceiver(receiver, [zeroed(transmitters[0])])
        modes["c2c-zeroed"] = run_mode(test_rows, KVScorer(control, {name: True}))
    report["modes"] = modes
    args.out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.out / "kv_knowledge.json", report, indent=2)
    plot(modes, len(rows[0].choices), args.out / "kv_knowledge.png")
    print(f"{len(test_rows)} facts the fuser never saw (chance {1 / len(rows[0].choices):.3f}):")
    for mode, result in modes.items():
        print(f"  {mode:18s} accuracy {result['accuracy']:.3f}")
    print(f"wrote {args.out / 'kv_knowledge.json'} and {args.out / 'kv_knowledge.png'}")


def plot(modes: dict, choices: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(list(modes), [m["accuracy"] for m in modes.values()], color="#2a7ab0")
    ax.axhline(1 / choices, color="grey", linestyle=":", label="chance")
    ax.set_ylabel("accuracy on facts the fuser never saw")
    ax.set_title("what the transmitter's cache carries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

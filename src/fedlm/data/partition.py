"""Split a data source across federated clients; every client keeps a held-out split of its own.

Sources (the `--data` value):
- `gsm8k`: GSM8K problems, shuffled once and cut into equal shards (IID);
- `shakespeare`: one client per speaking role, the roles with the most speeches (LEAF-style, non-IID);
- `mix`: the two-task mixture: even partitions get a Shakespeare role, odd ones a GSM8K shard;
- a path to a JSONL file: rows with `text`, or `prompt` + `target`, or `question` + `answer`, cut IID.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from fedlm.data.jsonl import DataError

SOURCES = ("gsm8k", "shakespeare", "mix")


@dataclass(frozen=True)
class ClientData:
    task: str  # what the client's data is about, for clustering purity ("gsm8k", "shakespeare", a file name)
    name: str  # the shard or the role
    train: list[str]
    heldout: list[str]


def gsm8k_text(question: str, answer: str) -> str:
    return f"Question: {question}\nAnswer: {answer}"


def split_heldout(texts: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle, then keep the last `heldout_fraction` (at least one text) for held-out evaluation."""
    if len(texts) < 2:
        raise DataError(f"a client needs at least 2 texts to keep a held-out split, got {len(texts)}")
    texts = texts[:]
    random.Random(seed).shuffle(texts)
    n_heldout = min(len(texts) - 1, max(1, round(len(texts) * heldout_fraction)))
    return texts[:-n_heldout], texts[-n_heldout:]


def shard(texts: list[str], partition_id: int, num_partitions: int, seed: int) -> list[str]:
    """The partition's equal share of `texts` after one seeded shuffle (the same for every client)."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order[partition_id::num_partitions]]


def read_jsonl_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"data file not found: {path} (use {', '.join(SOURCES)} or a JSONL path)")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "text" in row:
            texts.append(row["text"])
        elif "prompt" in row and "target" in row:
            texts.append(row["prompt"] + row["target"])
        elif "question" in row and "answer" in row:
            texts.append(gsm8k_text(row["question"], row["answer"]))
        else:
            raise DataError(f"{path}:{number}: a row needs `text`, `prompt`+`target` or `question`+`answer`")
    return texts


def client_data(
    source: str,
    partition_id: int,
    num_partitions: int,
    max_texts: int = 64,
    heldout_fraction: float = 0.25,
    seed: int = 0,
) -> ClientData:
    """The data partition `partition_id` of `num_partitions` holds, capped at `max_texts` texts (train + held-out)."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition {partition_id} is not in 0..{num_partitions - 1}")
    if source == "mix":
        if partition_id % 2 == 0:
            return client_data(
                "shakespeare", partition_id // 2, (num_partitions + 1) // 2, max_texts, heldout_fraction, seed
            )
        return client_data("gsm8k", partition_id // 2, num_partitions // 2, max_texts, heldout_fraction, seed)
    if source == "gsm8k":
        from fedlm.data.gsm8k import load_gsm8k

        texts = shard([gsm8k_text(r.question, r.answer) for r in load_gsm8k()], partition_id, num_partitions, seed)
        task, name = "gsm8k", f"shard-{partition_id}"
    elif source == "shakespeare":
        from fedlm.data.shakespeare import largest_roles

        name, texts = largest_roles(num_partitions)[partition_id]
        task = "shakespeare"
    else:
        path = Path(source)
        texts = shard(read_jsonl_texts(path), partition_id, num_partitions, seed)
        task, name = path.stem, f"shard-{partition_id}"
    train, heldout = split_heldout(texts[:max_texts], heldout_fraction, seed + partition_id)
    return ClientData(task, name, train, heldout)

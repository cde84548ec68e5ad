"""Offline data: Shakespeare roles, GSM8K, partitions with held-out splits, atomic checkpoints."""

import json

from fedlm.data.gsm8k import load_gsm8k
from fedlm.data.partition import client_data
from fedlm.data.shakespeare import parse_play
from fedlm.federated import checkpoint

PLAY = """ACT I. SCENE I. A platform.

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.
[Enter Horatio.]

Ber.
Long live the king!

[Exit.]

Still he speaks on.
"""


def test_parse_play_gives_one_client_per_role():
    roles = parse_play(PLAY)
    assert roles == {
        "Ber": ["Who's there?", "Long live the king!", "Still he speaks on."],
        "Fran": ["Nay, answer me: stand, and unfold yourself."],
    }


def test_gsm8k_rows_have_question_and_answer():
    rows = load_gsm8k(limit=3)
    assert len(rows) == 3 and rows[0].question and rows[0].final_answer == "18"


def test_partitions_are_disjoint_and_keep_heldout():
    parts = [client_data("gsm8k", pid, 3, max_texts=12) for pid in range(3)]
    for part in parts:
        assert len(part.train) == 9 and len(part.heldout) == 3
        assert not set(part.train) & set(part.heldout)
    assert not set(parts[0].train) & set(parts[1].train)


def test_two_task_mix_alternates_tasks(tmp_path):
    tasks = [client_data("mix", pid, 4, max_texts=8).task for pid in range(4)]
    assert tasks == ["shakespeare", "gsm8k", "shakespeare", "gsm8k"]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(10)) + "\n")
    part = client_data(str(path), 1, 2, max_texts=8)
    assert part.task == "rows" and len(part.train) + len(part.heldout) == 5


def test_checkpoint_is_atomic_and_round_trips(tmp_path):
    assert checkpoint.load(tmp_path) is None
    checkpoint.save(tmp_path, {"round": 2})
    checkpoint.save(tmp_path, {"round": 3})
    assert checkpoint.load(tmp_path) == {"round": 3}
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.CHECKPOINT]  # no temp file left behind

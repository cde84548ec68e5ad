"""Evaluation rows read from JSONL, with errors that name the file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class DataError(ValueError):
    """A data file is missing or a row does not match its task's format."""


class McqRow(BaseModel):
    """A multiple-choice question, scored by the log-likelihood of each choice."""

    model_config = ConfigDict(extra="ignore")
    question: str
    choices: list[str] = Field(min_length=2)
    answer: int

    @model_validator(mode="after")
    def _answer_in_range(self) -> McqRow:
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer {self.answer} is not an index into {len(self.choices)} choices")
        return self


class BpbRow(BaseModel):
    """A target text scored in bits per UTF-8 byte, given a prompt."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    target: str = Field(min_length=1)


Row = TypeVar("Row", McqRow, BpbRow)


def read_rows(path: str | Path, row_type: type[Row], limit: int | None = None) -> list[Row]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows: list[Row] = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(row_type.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValidationError) as err:
                fields = ", ".join(row_type.model_fields)
                raise DataError(f"{path}:{number}: not a valid {row_type.__name__} row ({fields}): {err}") from err
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows

"""GSM8K grade-school math problems from the official JSON Lines release.

Each line of `train.jsonl` and `test.jsonl` is {"question": ..., "answer": ...}. The
answer is a worked solution with calculator annotations such as "<<48/2=24>>" and a
last line "#### 72". The loader drops the annotations, takes the text after "####" as
the reference answer (commas removed, so "1,000" becomes "1000") and keeps the rest
as the gold reasoning.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from . import (
    BadRowHandler,
    DataError,
    Row,
    _read_text,
    _require_object,
    _require_string,
    _require_text,
    _skip_or_raise,
)

FILES = {"train": "train.jsonl", "test": "test.jsonl"}
FINAL_ANSWER_MARKER = "####"
_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
_EXPECTED = 'JSON Lines, one {"question": ..., "answer": ...} object per line'


def load(split: str, data_dir: Path, on_bad_row: BadRowHandler | None = None) -> list[Row]:
    """Load all rows of `split` from `data_dir / FILES[split]`, in file order.

    An invalid line raises DataError, or with `on_bad_row` is passed to it and skipped.
    """
    path = Path(data_dir) / FILES[split]
    text = _read_text(path, _EXPECTED)

    rows = []
    seen_line = False
    # Split on "\n" only: str.splitlines() would also split at U+2028 and other
    # separators that JSON allows unescaped inside strings.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        seen_line = True
        source = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            _skip_or_raise(DataError(
                f"{source}: invalid JSON at column {error.colno}: {error.msg}; "
                f"fix or remove this line (expected {_EXPECTED})"
            ), on_bad_row)
            continue
        try:
            rows.append(parse_record(record, source))
        except DataError as error:
            _skip_or_raise(error, on_bad_row)

    if not seen_line:
        raise DataError(f"{path}: file is empty; expected {_EXPECTED}")
    return rows


def parse_record(record: Any, source: str) -> Row:
    """Build a Row from one decoded GSM8K record. `source` goes into errors and the Row."""
    record = _require_object(record, source)
    question = _require_text(record, "question", source)
    solution = _require_string(record, "answer", source)

    if FINAL_ANSWER_MARKER not in solution:
        raise DataError(
            f"{source}: field 'answer' has no '{FINAL_ANSWER_MARKER}' line; a GSM8K solution "
            f"must end with '{FINAL_ANSWER_MARKER} <final answer>'"
        )
    worked_solution, _, final_answer = solution.rpartition(FINAL_ANSWER_MARKER)
    answer = final_answer.strip().replace(",", "")
    if not answer:
        raise DataError(
            f"{source}: field 'answer' has nothing after '{FINAL_ANSWER_MARKER}'; "
            f"write the final answer there"
        )
    reasoning = _CALCULATOR_ANNOTATION.sub("", worked_solution).strip()
    if not reasoning:
        raise DataError(
            f"{source}: field 'answer' has no worked solution before "
            f"'{FINAL_ANSWER_MARKER}'; add the reasoning steps or remove this line"
        )

    return Row(question=question, answer=answer, reasoning=reasoning, source=source)

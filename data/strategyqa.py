"""StrategyQA yes/no questions with a deterministic held-out split.

`strategyQA_train.json` is one JSON array of records with `qid`, `question`, `answer`
(a boolean), `facts` (a list of strings) and `decomposition`, which the loader does not
use. The answer becomes "yes" or "no", and the gold reasoning is the facts joined by
spaces.

StrategyQA publishes no labels for its test questions, so this loader holds out part of
the labelled file: a record is a test record when a SHA-256 hash of its `qid` is
divisible by TEST_MODULUS (about 1 in 5). Both splits keep the file order.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from . import (
    BadRowHandler,
    DataError,
    Row,
    _json_type,
    _read_json_array,
    _require_field,
    _require_object,
    _require_text,
    _skip_or_raise,
)

FILENAME = "strategyQA_train.json"
FILES = {"train": FILENAME, "test": FILENAME}
TEST_MODULUS = 5
_EXPECTED = "a JSON array of StrategyQA records (qid, question, answer, facts)"


def load(split: str, data_dir: Path, on_bad_row: BadRowHandler | None = None) -> list[Row]:
    """Load the rows of `split` from `data_dir / FILENAME`, in file order.

    Every record is checked, including those of the other split. An invalid record raises
    DataError, or with `on_bad_row` is passed to it and skipped, so loading both splits
    reports each invalid record twice.
    """
    path = Path(data_dir) / FILENAME
    records = _read_json_array(path, _EXPECTED)

    rows = []
    for index, record in enumerate(records):
        try:
            qid, row = parse_record(record, f"{path}[{index}]")
        except DataError as error:
            _skip_or_raise(error, on_bad_row)
            continue
        if split_for_qid(qid) == split:
            rows.append(row)
    return rows


def split_for_qid(qid: str) -> str:
    """Return "test" or "train" for a record, from a SHA-256 hash of its qid."""
    digest = hashlib.sha256(qid.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_MODULUS == 0 else "train"


def parse_record(record: Any, source: str) -> tuple[str, Row]:
    """Return (qid, Row) for one decoded StrategyQA record."""
    record = _require_object(record, source)
    qid = _require_text(record, "qid", source)
    question = _require_text(record, "question", source)

    answer = _require_field(record, "answer", source)
    if not isinstance(answer, bool):
        raise DataError(
            f"{source}: field 'answer' must be a boolean (true or false), got "
            f"{_json_type(answer)} {answer!r}; fix or remove this record"
        )

    facts = _require_field(record, "facts", source)
    if not isinstance(facts, list):
        raise DataError(
            f"{source}: field 'facts' must be a list of strings, got {_json_type(facts)}; "
            "fix or remove this record"
        )
    for position, fact in enumerate(facts):
        if not isinstance(fact, str):
            raise DataError(
                f"{source}: field 'facts' item {position} is {_json_type(fact)}, expected "
                "a string; fix or remove this record"
            )
    # Normalise whitespace: some facts have doubled or trailing spaces.
    reasoning = " ".join(" ".join(fact.split()) for fact in facts if fact.strip())
    if not reasoning:
        raise DataError(
            f"{source}: field 'facts' is empty, so the record has no gold reasoning; "
            "add facts or remove this record"
        )

    row = Row(question=question, answer="yes" if answer else "no", reasoning=reasoning, source=source)
    return qid, row

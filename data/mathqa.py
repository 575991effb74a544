"""MathQA multiple-choice math problems from the official release.

`dev.json` is used as the train split and `test.json` as the test split, and the
official train.json is not read. Each file is one JSON array of records. The loader
reads `Problem`, `Rationale`, `options` and `correct` (an option letter) and ignores
the other fields. The reference answer is the letter, and the gold reasoning is the
rationale without its surrounding quotes. Many rationales end with a sentence such as
"answer : c", which the loader keeps.

`options` is usually one string, "a ) 38 , b ) 27.675 , c ) 25 , d ) 35 , e ) none of
these", in which option texts may themselves contain commas ("a ) rs . 1,200 , b ) ...").
Some records write it as a Python list literal instead, "['a ) 4', 'b ) 4 π', ...]",
and some repeat the label inside the text, "a ) a ) 3". `parse_options` handles all of
these.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

from . import (
    BadRowHandler,
    DataError,
    Row,
    _read_json_array,
    _require_field,
    _require_object,
    _require_text,
    _skip_or_raise,
)

FILES = {"train": "dev.json", "test": "test.json"}
OPTION_LETTERS = "abcde"
_EXPECTED = "a JSON array of MathQA records (Problem, Rationale, options, correct)"
_FIRST_LABEL = re.compile(r"a\s*\)\s*")
# Matches the " , b ) " boundary before option `letter` inside the one-string form.
_BOUNDARIES = {letter: re.compile(rf"\s*,\s*{letter}\s*\)\s*") for letter in OPTION_LETTERS[1:]}
_LABELLED_ITEM = re.compile(r"\s*([a-e])\s*\)\s*(.*)", re.DOTALL)
_REPEATED_LABEL = re.compile(r"^[a-e]\s*\)\s*")


def load(split: str, data_dir: Path, on_bad_row: BadRowHandler | None = None) -> list[Row]:
    """Load all rows of `split` from `data_dir / FILES[split]`, in file order.

    An invalid record raises DataError, or with `on_bad_row` is passed to it and skipped.
    """
    path = Path(data_dir) / FILES[split]
    records = _read_json_array(path, _EXPECTED)
    rows = []
    for index, record in enumerate(records):
        try:
            rows.append(parse_record(record, f"{path}[{index}]"))
        except DataError as error:
            _skip_or_raise(error, on_bad_row)
    return rows


def parse_record(record: Any, source: str) -> Row:
    """Build a Row from one decoded MathQA record. `source` goes into errors and the Row."""
    record = _require_object(record, source)
    question = _require_text(record, "Problem", source)

    rationale = _require_text(record, "Rationale", source)
    if len(rationale) >= 2 and rationale[0] == rationale[-1] == '"':
        rationale = rationale[1:-1].strip()
    if not rationale:
        raise DataError(f"{source}: field 'Rationale' is empty; fix or remove this record")

    raw_options = _require_field(record, "options", source)
    try:
        options = parse_options(raw_options)
    except ValueError as error:
        raise DataError(
            f"{source}: field 'options' could not be parsed ({error}): {raw_options!r}; "
            "expected 'a ) ... , b ) ... , c ) ... , d ) ... , e ) ...'"
        ) from None

    correct = _require_text(record, "correct", source).lower()
    if correct not in options:
        raise DataError(
            f"{source}: field 'correct' is {correct!r}, which is not one of the option "
            f"letters {', '.join(options)}; fix or remove this record"
        )

    return Row(
        question=question, answer=correct, reasoning=rationale, source=source, options=options
    )


def parse_options(options: str | list[str]) -> dict[str, str]:
    """Parse MathQA options into {"a": text, "b": text, ...}.

    Accepts the one-string form "a ) 38 , b ) 27.675 , ...", the same options as a
    Python list literal in a string or as a JSON list, and labels repeated inside the
    text ("a ) a ) 3" gives "3"). Options must start at "a" and run in letter order,
    at least two and at most five of them. Raises ValueError saying what is wrong.
    """
    if isinstance(options, list):
        return _parse_option_items(options)
    if not isinstance(options, str):
        raise ValueError(f"expected a string, got {type(options).__name__}")

    text = options.strip()
    if text.startswith("["):
        try:
            items = ast.literal_eval(text)
        except (ValueError, SyntaxError, RecursionError, MemoryError):
            raise ValueError("starts with '[' but is not a valid list literal") from None
        if not isinstance(items, list):
            raise ValueError("starts with '[' but is not a list")
        return _parse_option_items(items)
    return _parse_option_string(text)


def _parse_option_string(text: str) -> dict[str, str]:
    first = _FIRST_LABEL.match(text)
    if first is None:
        raise ValueError("does not start with 'a )'")

    # Find the " , b ) ", " , c ) ", ... boundaries in order, so that commas inside an
    # option's text are not taken as separators.
    raw_texts = {}
    letter, start = "a", first.end()
    for next_letter in OPTION_LETTERS[1:]:
        boundary = _BOUNDARIES[next_letter].search(text, start)
        if boundary is None:
            break
        raw_texts[letter] = text[start : boundary.start()]
        letter, start = next_letter, boundary.end()
    raw_texts[letter] = text[start:]
    return _clean_option_texts(raw_texts)


def _parse_option_items(items: list[Any]) -> dict[str, str]:
    raw_texts = {}
    for position, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"list item {position} is not a string")
        match = _LABELLED_ITEM.fullmatch(item)
        if match is None:
            raise ValueError(f"list item {position} does not start with a label like 'a )'")
        letter, option_text = match.groups()
        if position >= len(OPTION_LETTERS) or letter != OPTION_LETTERS[position]:
            raise ValueError(f"list item {position} has label {letter!r} out of order")
        raw_texts[letter] = option_text
    return _clean_option_texts(raw_texts)


def _clean_option_texts(raw_texts: dict[str, str]) -> dict[str, str]:
    if len(raw_texts) < 2:
        raise ValueError(f"only {len(raw_texts)} option found, expected two to five")
    options = {}
    for letter, raw_text in raw_texts.items():
        # Drop one repeated label: "a ) a ) 3" and "e ) d ) 36" occur in the release.
        option_text = _REPEATED_LABEL.sub("", raw_text.strip(), count=1).strip()
        if not option_text:
            raise ValueError(f"option {letter!r} is empty")
        options[letter] = option_text
    return options

"""Datasets for PCL: one `Row` type, the loaders and the prompt templates.

`load_rows(name, split, ...)` returns rows of any dataset in `DATASETS`, and
`format_prompt(name, row)` renders the prompt for a row. The completion that the model
writes starts right after the prompt with "<think>".

The real datasets are read from local files under `data_dir`. Bad input raises
`DataError`, whose message names the file, the line or record index, and the field. With
`on_bad_row`, an invalid row is passed to that callback and skipped instead.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Row:
    """One question with its reference answer and gold reasoning."""

    # Question text, stripped of surrounding whitespace.
    question: str
    # Reference final answer: an integer string ("42") for synthetic and gsm8k, "yes" or
    # "no" for strategyqa, an option letter "a".."e" for mathqa.
    answer: str
    # Gold step-by-step reasoning as plain text, without tags.
    reasoning: str
    # Origin for error messages: "path/train.jsonl:17" (1-based line),
    # "path/dev.json[17]" (0-based record index) or "synthetic:train:5" (row index).
    source: str
    # Option letter -> option text for mathqa, e.g. {"a": "38", "b": "27.675"}. None for the
    # other datasets.
    options: dict[str, str] | None = None


class DataError(ValueError):
    """Invalid or missing dataset input. The message names the place and the fix."""


class RowError(DataError):
    """One invalid row, which load_rows skips instead of raising when given `on_bad_row`."""


# Called with the error of each invalid row, which the loader then skips.
BadRowHandler = Callable[[DataError], None]


DATASETS = ("synthetic", "gsm8k", "strategyqa", "mathqa")
SPLITS = ("train", "test")

# Default length limit, in tokens, of a generated completion on each dataset. The real datasets'
# gold reasoning is much longer than the synthetic task's.
MAX_NEW_TOKENS = {"synthetic": 96, "gsm8k": 320, "strategyqa": 256, "mathqa": 320}

# One plain-text template per dataset. Fields: {question}, and {options} for mathqa
# (one "a) text" line per option). Every prompt ends with a newline, and the
# completion that follows starts with "<think>". The synthetic template is the
# shortest because the default model is tiny.
PROMPT_TEMPLATES = {
    "synthetic": "{question}\nFormat: <think>steps</think><answer>number</answer>\n",
    "gsm8k": (
        "{question}\n"
        "Write your reasoning inside <think></think>, "
        "then only the final number inside <answer></answer>.\n"
    ),
    "strategyqa": (
        "{question}\n"
        "Write your reasoning inside <think></think>, "
        "then yes or no inside <answer></answer>.\n"
    ),
    "mathqa": (
        "{question}\n"
        "Options:\n"
        "{options}\n"
        "Write your reasoning inside <think></think>, "
        "then the letter of the correct option inside <answer></answer>.\n"
    ),
}


def load_rows(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    on_bad_row: BadRowHandler | None = None,
) -> list[Row]:
    """Load the rows of one dataset split.

    `split` is "train" or "test". `data_dir` is the folder that contains the dataset's
    files and is required for every dataset except "synthetic". `limit` keeps the
    first `limit` rows, taken after the dataset's own deterministic train/test split.
    For "synthetic", `limit` is the number of rows to generate (default: 20000 train,
    200 test). `seed` affects only the synthetic task.

    An invalid row raises DataError. With `on_bad_row`, each invalid row's error is passed
    to it instead and the row is skipped. Errors that concern a whole file (missing, not
    valid UTF-8, not a JSON array, empty) raise either way, and so does a split left
    without rows.
    """
    check_dataset_name(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"limit must be a non-negative integer or None, got {limit!r}")

    module = importlib.import_module(f"{__name__}.{name}")
    if name == "synthetic":
        size = module.DEFAULT_SIZES[split] if limit is None else limit
        return module.generate(split, size, seed=seed)

    if data_dir is None:
        raise DataError(
            f"dataset {name!r} is read from local files: pass --data-dir DIR, "
            f"the folder that contains {module.FILES[split]}"
        )
    directory = Path(data_dir)
    if not directory.is_dir():
        raise DataError(
            f"--data-dir {directory}: directory not found; it must be the folder "
            f"that contains {module.FILES[split]}"
        )
    skipped: list[DataError] = []

    def skip(error: DataError):
        skipped.append(error)
        on_bad_row(error)

    rows = module.load(split, directory, skip if on_bad_row else None)
    if not rows:
        after = f" after skipping {len(skipped)} invalid rows" if skipped else ""
        raise DataError(
            f"{directory / module.FILES[split]}: no rows for split {split!r}{after}; "
            "fix the file or pass another --data-dir"
        )
    return rows if limit is None else rows[:limit]


def format_prompt(name: str, row: Row) -> str:
    """Render the prompt for `row` from the template of dataset `name`."""
    template = PROMPT_TEMPLATES[check_dataset_name(name)]
    options_text = ""
    if name == "mathqa":
        if not row.options:
            raise DataError(
                f"{row.source}: a mathqa prompt needs the row's options, but the row "
                "has none; load mathqa rows with load_rows('mathqa', ...)"
            )
        options_text = "\n".join(f"{letter}) {text}" for letter, text in row.options.items())
    return template.format(question=row.question, options=options_text)


def check_dataset_name(name: str) -> str:
    """Return `name` unchanged, or raise DataError listing the valid dataset names."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}")
    return name


# Helpers shared by the file loaders in this package.


def _skip_or_raise(error: DataError, on_bad_row: BadRowHandler | None):
    """Raise `error` as a RowError, or hand it to `on_bad_row` so that the caller skips the row."""
    if on_bad_row is None:
        raise RowError(*error.args) from None
    on_bad_row(error)


def _read_text(path: Path, expected: str) -> str:
    """Read a UTF-8 file. `expected` describes the content for the error message."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(
            f"{path}: file not found; --data-dir must be the folder that contains {path.name} "
            f"({expected})"
        ) from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file ({expected})") from None
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path}: not valid UTF-8 at byte {error.start}; re-save the file as UTF-8"
        ) from None


def _read_json_array(path: Path, expected: str) -> list[Any]:
    """Read a file that contains one non-empty JSON array."""
    text = _read_text(path, expected)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}; "
            f"expected {expected}"
        ) from None
    if not isinstance(records, list):
        raise DataError(
            f"{path}: the top-level JSON value is {_json_type(records)}, expected {expected}"
        )
    if not records:
        raise DataError(f"{path}: the JSON array is empty, expected {expected}")
    return records


def _require_object(record: Any, source: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(
            f"{source}: record is {_json_type(record)}, expected a JSON object; "
            "fix or remove this record"
        )
    return record


def _require_field(record: dict[str, Any], field: str, source: str) -> Any:
    if field not in record:
        raise DataError(
            f"{source}: field {field!r} is missing; fix or remove this record"
        )
    return record[field]


def _require_string(record: dict[str, Any], field: str, source: str) -> str:
    value = _require_field(record, field, source)
    if not isinstance(value, str):
        raise DataError(
            f"{source}: field {field!r} must be a string, got {_json_type(value)}; "
            "fix or remove this record"
        )
    return value


def _require_text(record: dict[str, Any], field: str, source: str) -> str:
    """Return the string field stripped, raising DataError if it is blank."""
    value = _require_string(record, field, source).strip()
    if not value:
        raise DataError(f"{source}: field {field!r} is empty; fix or remove this record")
    return value


def _json_type(value: Any) -> str:
    """Name a decoded JSON value's type as JSON does, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__

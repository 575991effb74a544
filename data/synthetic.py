"""Synthetic arithmetic word problems: the default task, small enough for a tiny model.

A problem gives a person a start quantity of some object and then applies one to three
additions or subtractions, for example:

    question:  "Ava has 12 apples. She buys 7 more. She gives away 5.
                How many apples does Ava have now?"
    reasoning: "12 + 7 = 19. 19 - 5 = 14."
    answer:    "14"

The start quantity is 1..20, each operand 1..9, and every intermediate result and the
answer stay in 0..40. Names, objects and verb phrases come from small fixed lists so
that the vocabulary stays small.

A question belongs to the test split when a SHA-256 hash of its text is divisible by
TEST_MODULUS, so train and test never share a question, whatever the seed or size.
"""

from __future__ import annotations

import hashlib
import random

from . import DataError, Row, SPLITS

DEFAULT_SIZES = {"train": 20000, "test": 200}

# (name, subject pronoun)
NAMES = (
    ("Ava", "She"),
    ("Ben", "He"),
    ("Mia", "She"),
    ("Leo", "He"),
    ("Zoe", "She"),
    ("Sam", "He"),
    ("Eva", "She"),
    ("Tom", "He"),
)
# (singular, plural)
OBJECTS = (
    ("apple", "apples"),
    ("pen", "pens"),
    ("book", "books"),
    ("coin", "coins"),
    ("card", "cards"),
    ("shell", "shells"),
    ("marble", "marbles"),
    ("sticker", "stickers"),
)
ADD_PHRASES = ("buys {} more", "finds {} more", "gets {} more", "wins {} more")
SUBTRACT_PHRASES = ("gives away {}", "loses {}", "sells {}", "donates {}")

START_MIN, START_MAX = 1, 20
OPERAND_MIN, OPERAND_MAX = 1, 9
VALUE_MAX = 40
STEP_COUNTS = (1, 2, 3)
TEST_MODULUS = 10  # 1 in 10 questions is a test question.

# Guard against an endless loop when `n` exceeds the number of distinct questions of a
# split (several hundred thousand per step count).
_MAX_REJECTIONS_IN_A_ROW = 100_000


def generate(split: str, n: int, seed: int = 0) -> list[Row]:
    """Generate the first `n` distinct problems of `split` for `seed`.

    The output is deterministic, and a smaller `n` gives a prefix of a larger one.
    Row i has STEP_COUNTS[i % 3] steps, so step counts are spread evenly.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"n must be a non-negative integer, got {n!r}")

    rng = random.Random(seed)
    rows: list[Row] = []
    seen: set[str] = set()
    rejections_in_a_row = 0
    while len(rows) < n:
        step_count = STEP_COUNTS[len(rows) % len(STEP_COUNTS)]
        question, reasoning, answer = _make_problem(rng, step_count)
        if question in seen or split_for_question(question) != split:
            rejections_in_a_row += 1
            if rejections_in_a_row >= _MAX_REJECTIONS_IN_A_ROW:
                raise DataError(
                    f"synthetic:{split}: found no new {step_count}-step question after "
                    f"{rejections_in_a_row} tries at row {len(rows)}; request fewer rows"
                )
            continue

        rejections_in_a_row = 0
        seen.add(question)
        source = f"synthetic:{split}:{len(rows)}"
        rows.append(Row(question=question, answer=answer, reasoning=reasoning, source=source))
    return rows


def split_for_question(question: str) -> str:
    """Return "test" or "train" for a question, from a SHA-256 hash of its text."""
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % TEST_MODULUS == 0 else "train"


def _make_problem(rng: random.Random, step_count: int) -> tuple[str, str, str]:
    """Draw one problem and return (question, reasoning, answer)."""
    name, pronoun = rng.choice(NAMES)
    singular, plural = rng.choice(OBJECTS)
    value = rng.randint(START_MIN, START_MAX)
    noun = singular if value == 1 else plural

    sentences = [f"{name} has {value} {noun}."]
    steps = []
    for _ in range(step_count):
        can_add = value + OPERAND_MIN <= VALUE_MAX
        can_subtract = value >= OPERAND_MIN
        if can_add and (not can_subtract or rng.random() < 0.5):
            operand = rng.randint(OPERAND_MIN, min(OPERAND_MAX, VALUE_MAX - value))
            phrase, symbol, result = rng.choice(ADD_PHRASES), "+", value + operand
        else:
            operand = rng.randint(OPERAND_MIN, min(OPERAND_MAX, value))
            phrase, symbol, result = rng.choice(SUBTRACT_PHRASES), "-", value - operand
        sentences.append(f"{pronoun} {phrase.format(operand)}.")
        steps.append(f"{value} {symbol} {operand} = {result}.")
        value = result

    sentences.append(f"How many {plural} does {name} have now?")
    return " ".join(sentences), " ".join(steps), str(value)

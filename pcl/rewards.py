"""White-box reward rules of Post-Completion Learning, as plain functions on decoded text.

A completion is the text generated after the prompt, with optional whitespace between the parts:

    <think>...</think> <answer>...</answer> <post-completion>
    <evaluation>...</evaluation> <reward>2</reward>

The text before the first ``<post-completion>`` marker is the answer part, scored by the format and
accuracy rules. The text after it is the post-completion part, where the model states its own
predicted reward. With the default weights the true reward ``r = w_acc * r_acc + w_fmt * r_fmt`` is
0, 1 or 2, and the RL reward adds ``w_con * r_con`` for predicting ``r`` correctly.

Standard library only, so data loaders, evaluation scripts and tests can import this module without
torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

MARKER = "<post-completion>"

# Largest difference between two rewards that still counts as equal. It absorbs float noise and the
# rounding of format_number, which renders rewards with at most 9 decimal places.
REWARD_TOLERANCE = 1e-9

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
EVALUATION_OPEN, EVALUATION_CLOSE = "<evaluation>", "</evaluation>"
REWARD_OPEN, REWARD_CLOSE = "<reward>", "</reward>"

# Every tag of the post-completion format. None of them may appear inside the think or answer text
# of a well-formatted completion.
TAGS = (
    THINK_OPEN,
    THINK_CLOSE,
    ANSWER_OPEN,
    ANSWER_CLOSE,
    MARKER,
    EVALUATION_OPEN,
    EVALUATION_CLOSE,
    REWARD_OPEN,
    REWARD_CLOSE,
)

TASKS = ("synthetic", "gsm8k", "strategyqa", "mathqa")

# Template of the self-evaluation text that the evaluation track teaches. It states each sub-reward
# by rule name before the total, so the model learns how the reward is computed. Fields:
# {format} and {accuracy} are the sub-rewards (0 or 1), {total} is the true reward r, and
# {format_weight} and {accuracy_weight} are the weights. Total and weights are rendered by format_number.
# Lines are short because the default model is tiny and trains for minutes on a CPU.
EVALUATION_TEMPLATE = "format: {format}\naccuracy: {accuracy}\ntotal: {total}"

# Predicted reward inside <reward>...</reward>: a plain decimal with an optional exponent. Python's
# float() also accepts "nan", "inf" and digit underscores, which must not count as a prediction.
_REWARD_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")

# A number inside free answer text. Alternatives, in the order they are tried:
#   "3/4" or "3 / 4"   a fraction of two integers, compared as its exact value
#   "1,200.50"         a decimal with comma thousands separators
#   "1200.50", "14"    a plain decimal or integer
#   ".5"               a decimal without a leading zero
# A minus sign counts only where it cannot be a subtraction, that is, not right after a letter,
# digit or closing bracket: "-3" and "x = -3" are negative, "10-3" yields 10 and 3. A trailing
# period is never part of the number, so "14." is 14.
# NOTE: scientific notation is not recognized, so "1e3" yields 1 and 3 instead of 1000.
_ANSWER_NUMBER = re.compile(
    r"(?:(?<![\w)\]])(?P<sign>[-\u2212]))?"
    r"(?<!\d)(?<!\d\.)"
    r"(?P<body>"
    r"\d+\s*/\s*\d+"
    r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?(?![\d,])"
    r"|\d+(?:\.\d+)?"
    r"|(?<!\w)\.\d+"
    r")"
)

_YES_NO = {"yes": True, "true": True, "no": False, "false": False}

# MathQA option letter written alone: "c", "C", "c.", "c)", "c )", "(c)", "option c", "option (c)".
_OPTION_LETTER = re.compile(
    r"(?:option\s*)?(?:\(\s*(?P<paren>[a-e])\s*\)|(?P<bare>[a-e])\s*\)?)\s*\.?",
    re.IGNORECASE,
)

# MathQA option letter followed by its value text, in the dataset's own "c ) 625" style.
_OPTION_LETTER_AND_VALUE = re.compile(
    r"(?:option\s*)?\(?\s*(?P<letter>[a-e])\s*\)\s*(?P<value>\S.*)",
    re.IGNORECASE | re.DOTALL,
)


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the sub-rewards in the true reward r and the RL reward R."""

    accuracy: float = 1.0
    format: float = 1.0
    consistency: float = 1.0
    graded_consistency: bool = False  # r_con = 1 - |r_hat - r| / r_max instead of exact match

    def __post_init__(self) -> None:
        for name in ("accuracy", "format", "consistency"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"RewardWeights.{name} must be a finite number >= 0, got {value!r}")
        if self.max_reward <= 0:
            raise ValueError(
                "RewardWeights.accuracy + RewardWeights.format must be > 0, because otherwise the "
                f"true reward is always 0; got {self.accuracy!r} + {self.format!r}"
            )

    @property
    def max_reward(self) -> float:
        """Largest true reward r, reached with a correct and well-formatted answer."""
        return self.accuracy + self.format

    def reward_values(self) -> list[float]:
        """Return the sorted distinct values that the true reward r can take."""
        values = {self.accuracy * accuracy + self.format * fmt for accuracy in (0, 1) for fmt in (0, 1)}
        return sorted(values)


@dataclass(frozen=True)
class Scores:
    """All rewards of one completion."""

    accuracy: int  # r_acc, 0 or 1
    format: int  # r_fmt, 0 or 1
    total: float  # true reward r = w_acc * r_acc + w_fmt * r_fmt
    predicted: float | None  # r_hat parsed after the marker, None when there is no valid prediction
    consistency: float  # r_con
    rl: float  # RL reward R = w_acc * r_acc + w_fmt * r_fmt + w_con * r_con


# ---------------------------------------------------------------------------------------------------
# Answer part: format and answer extraction


def split_completion(text: str) -> tuple[str, str | None]:
    """Split a completion at the first marker into (text before it, text after it).

    Returns (text, None) when there is no marker, as in inference output that stopped at the marker.
    """
    before, marker, after = text.partition(MARKER)
    if not marker:
        return text, None
    return before, after


def format_reward(completion: str) -> int:
    """Return 1 if the answer part is one non-empty think block followed by one non-empty answer block.

    Only the text before the marker counts, so a completion without a marker can still score 1.
    Whitespace may surround the blocks, but any other text outside them gives 0. A block is empty
    when it contains only whitespace. A think or answer text that contains any format tag gives 0,
    which rejects nested and repeated blocks.
    """
    answer_part, _ = split_completion(completion)
    think, rest = _take_block(answer_part, THINK_OPEN, THINK_CLOSE)
    if think is None:
        return 0
    answer, rest = _take_block(rest, ANSWER_OPEN, ANSWER_CLOSE)
    if answer is None or rest.strip():
        return 0

    for block in (think, answer):
        if not block.strip():
            return 0
        if any(tag in block for tag in TAGS):
            return 0
    return 1


def _take_block(text: str, open_tag: str, close_tag: str) -> tuple[str | None, str]:
    """Parse one tagged block at the start of `text`, after optional whitespace.

    Returns (content, text after the close tag), or (None, text) when `text` does not start with
    `open_tag` or has no `close_tag` after it. Stopping at the first close tag loses no valid
    completion, because content that contains a close tag is rejected anyway, and it keeps the
    check linear in the text length.
    """
    stripped = text.lstrip()
    if not stripped.startswith(open_tag):
        return None, text
    end = stripped.find(close_tag, len(open_tag))
    if end < 0:
        return None, text
    return stripped[len(open_tag) : end], stripped[end + len(close_tag) :]


def extract_answer(completion: str) -> str | None:
    """Return the stripped text of the last complete answer block before the marker.

    Returns None when there is no complete block or the last one is empty. When answer tags are
    nested, the innermost text of the last block counts: "<answer>a<answer>b</answer>" gives "b".
    """
    answer_part, _ = split_completion(completion)
    end = answer_part.rfind(ANSWER_CLOSE)
    if end < 0:
        return None
    start = answer_part.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None

    answer = answer_part[start + len(ANSWER_OPEN) : end].strip()
    return answer or None


# ---------------------------------------------------------------------------------------------------
# Accuracy rules, one per task


def accuracy_reward(
    task: str,
    answer: str | None,
    reference: str,
    options: dict[str, str] | None = None,
) -> int:
    """Return 1 if the answer matches the reference under the task's rule, else 0.

    Rules:
    - synthetic, gsm8k: the last number of each text, compared exactly (see _parse_numbers).
      Units, words, "$", commas and trailing zeros are ignored, so "$1,200.00 dollars" equals "1200".
    - strategyqa: the reference is yes/no (or true/false). The answer's first word, with punctuation
      stripped, must be yes/no/true/false with the same truth value, in any case.
    - mathqa: the reference is an option letter a-e. The answer may be the letter ("c", "(c)",
      "c )", "option c"), the letter with its value ("c ) 625"), or the value text of the
      reference option, which needs `options` (see _option_value_matches).
    A None answer gives 0. Raises ValueError for an unknown task or an invalid reference, because
    those are bugs in the caller or the data, not wrong answers.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")

    if task in ("synthetic", "gsm8k"):
        return _numeric_accuracy(answer, reference)
    if task == "strategyqa":
        return _yes_no_accuracy(answer, reference)
    return _option_accuracy(answer, reference, options)


def _parse_numbers(text: str) -> list[Fraction | None]:
    """Return the exact values of the numbers in `text`, in order. A fraction over zero gives None."""
    values: list[Fraction | None] = []
    for match in _ANSWER_NUMBER.finditer(text):
        body = re.sub(r"[\s,]", "", match.group("body"))
        sign = "-" if match.group("sign") else ""
        try:
            values.append(Fraction(sign + body))
        except ZeroDivisionError:
            values.append(None)
    return values


def _last_number(text: str) -> Fraction | None:
    values = _parse_numbers(text)
    return values[-1] if values else None


def _numeric_accuracy(answer: str | None, reference: str) -> int:
    expected = _last_number(reference)
    if expected is None:
        raise ValueError(f"numeric reference {reference!r} contains no valid number")
    if answer is None:
        return 0

    return int(_last_number(answer) == expected)


def _parse_yes_no(text: str) -> bool | None:
    words = text.split()
    if not words:
        return None
    first_word = re.sub(r"[^\w]", "", words[0]).lower()
    return _YES_NO.get(first_word)


def _yes_no_accuracy(answer: str | None, reference: str) -> int:
    expected = _parse_yes_no(reference)
    if expected is None:
        raise ValueError(f"strategyqa reference {reference!r} is not yes, no, true or false")
    if answer is None:
        return 0

    return int(_parse_yes_no(answer) == expected)


def _normalize_option_text(text: str) -> str:
    """Lowercase, collapse whitespace, drop spaces next to punctuation and any trailing period.

    Spaces next to punctuation are dropped because MathQA writes values tokenized, such as
    "1 / 2" and "27 sq . m", while a model may write "1/2" and "27 sq. m".
    """
    text = " ".join(text.lower().split())
    text = re.sub(r"\s*([^\w\s])\s*", r"\1", text)
    return text.rstrip(".")


def _option_value_matches(answer: str, value: str) -> bool:
    """Compare an answer with one option value: as text, or as numbers when each holds exactly one.

    Text is compared after _normalize_option_text. Numeric comparison ignores units, so "625"
    matches "625 ways" and "0.5" matches "1 / 2". A value with several numbers, such as "3 : 5" or
    "34 √ 3 cm 2", matches only as text.
    """
    if _normalize_option_text(answer) == _normalize_option_text(value):
        return True

    answer_numbers = _parse_numbers(answer)
    value_numbers = _parse_numbers(value)
    if len(answer_numbers) != 1 or len(value_numbers) != 1:
        return False
    return answer_numbers[0] is not None and answer_numbers[0] == value_numbers[0]


def _option_accuracy(answer: str | None, reference: str, options: dict[str, str] | None) -> int:
    expected = reference.strip().lower()
    if expected not in ("a", "b", "c", "d", "e"):
        raise ValueError(f"mathqa reference {reference!r} is not an option letter a-e")
    if answer is None:
        return 0

    values = {letter.strip().lower(): value for letter, value in (options or {}).items()}
    text = answer.strip()

    letter_match = _OPTION_LETTER.fullmatch(text)
    if letter_match is not None:
        letter = letter_match.group("paren") or letter_match.group("bare")
        return int(letter.lower() == expected)

    # "c ) 625" counts only when the letter is the reference and the value is that option's value,
    # so without `options` it never counts.
    letter_and_value = _OPTION_LETTER_AND_VALUE.fullmatch(text)
    if letter_and_value is not None:
        letter = letter_and_value.group("letter").lower()
        if letter != expected or expected not in values:
            return 0
        return int(_option_value_matches(letter_and_value.group("value"), values[expected]))

    if expected not in values:
        return 0
    return int(_option_value_matches(text, values[expected]))


# ---------------------------------------------------------------------------------------------------
# True reward, predicted reward and consistency


def true_reward(accuracy: int, fmt: int, weights: RewardWeights) -> float:
    """Return the true reward r = w_acc * accuracy + w_fmt * fmt, for sub-rewards in {0, 1}."""
    for name, value in (("accuracy", accuracy), ("fmt", fmt)):
        if value not in (0, 1):
            raise ValueError(f"{name} sub-reward must be 0 or 1, got {value!r}")
    return weights.accuracy * accuracy + weights.format * fmt


def parse_predicted_reward(post_text: str | None, weights: RewardWeights) -> float | None:
    """Parse the predicted reward r_hat from the first <reward>...</reward> of the post-completion text.

    Never raises. Returns None, meaning no prediction, unless the tag contains exactly one finite
    number in [0, weights.max_reward], optionally surrounded by whitespace. So a missing or unclosed
    tag, an empty tag, two numbers, "nan", "inf", "1e309" or any other text gives None. The upper
    bound allows REWARD_TOLERANCE, because format_number may round max_reward up, as with
    1.666666667 for weights 2/3 and 1.
    """
    if not isinstance(post_text, str):
        return None
    start = post_text.find(REWARD_OPEN)
    if start < 0:
        return None
    start += len(REWARD_OPEN)
    end = post_text.find(REWARD_CLOSE, start)
    if end < 0:
        return None

    content = post_text[start:end].strip()
    if _REWARD_NUMBER.fullmatch(content) is None:
        return None
    value = float(content)
    if not math.isfinite(value) or not 0 <= value <= weights.max_reward + REWARD_TOLERANCE:
        return None
    return value + 0.0  # turns -0.0 into 0.0


def consistency_reward(predicted: float | None, true: float, weights: RewardWeights) -> float:
    """Score how well the predicted reward matches the true reward, in [0, 1].

    Both modes give 1.0 when predicted and true differ by at most REWARD_TOLERANCE. Otherwise
    exact mode gives 0.0 and graded mode gives 1 - |predicted - true| / max_reward, clipped to
    [0, 1]. No prediction (None) gives 0.0.
    """
    if predicted is None:
        return 0.0
    error = abs(predicted - true)
    if error <= REWARD_TOLERANCE:
        return 1.0
    if not weights.graded_consistency:
        return 0.0
    return min(1.0, max(0.0, 1.0 - error / weights.max_reward))


def score(
    task: str,
    completion: str,
    reference: str,
    weights: RewardWeights,
    options: dict[str, str] | None = None,
) -> Scores:
    """Compute every reward of a whole decoded completion, before and after the marker."""
    _, post_text = split_completion(completion)
    fmt = format_reward(completion)
    accuracy = accuracy_reward(task, extract_answer(completion), reference, options)
    total = true_reward(accuracy, fmt, weights)

    predicted = parse_predicted_reward(post_text, weights)
    consistency = consistency_reward(predicted, total, weights)
    rl = total + weights.consistency * consistency
    return Scores(
        accuracy=accuracy,
        format=fmt,
        total=total,
        predicted=predicted,
        consistency=consistency,
        rl=rl,
    )


# ---------------------------------------------------------------------------------------------------
# Evaluation-track text


def format_number(value: float) -> str:
    """Render a reward as the model should write it: "2" for 2.0, "1.5" for 1.5.

    The value is rounded to 9 decimal places, so float noise such as 0.30000000000000004 renders as
    "0.3". The rendered text parses back to within REWARD_TOLERANCE of the value. There are
    never trailing zeros or an exponent. Raises ValueError for nan or infinity.
    """
    if not math.isfinite(value):
        raise ValueError(f"cannot render a non-finite reward {value!r}")
    rounded = round(float(value), 9) + 0.0  # adding 0.0 turns -0.0 into 0.0
    return format(Decimal(repr(rounded)).normalize(), "f")


def render_evaluation(accuracy: int, fmt: int, weights: RewardWeights) -> tuple[str, str]:
    """Render the (evaluation text, reward text) of the evaluation track from the true sub-rewards.

    The evaluation text fills EVALUATION_TEMPLATE, and the reward text is format_number(total),
    which parse_predicted_reward reads back as the true reward.
    """
    total = true_reward(accuracy, fmt, weights)
    evaluation = EVALUATION_TEMPLATE.format(
        format=fmt,
        accuracy=accuracy,
        total=format_number(total),
        format_weight=format_number(weights.format),
        accuracy_weight=format_number(weights.accuracy),
    )
    return evaluation, format_number(total)

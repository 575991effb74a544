import math

import pytest

from pcl.rewards import (
    EVALUATION_TEMPLATE,
    MARKER,
    RewardWeights,
    Scores,
    accuracy_reward,
    consistency_reward,
    extract_answer,
    format_number,
    format_reward,
    parse_predicted_reward,
    render_evaluation,
    score,
    split_completion,
    true_reward,
)

DEFAULT = RewardWeights()
GRADED = RewardWeights(graded_consistency=True)

GOOD = "<think>12 + 7 = 19. 19 - 5 = 14.</think>\n<answer>14</answer>"
POST = "\n<evaluation>format: 1\naccuracy: 1\ntotal: 2</evaluation>\n<reward>2</reward>"


def completion(answer_part: str, evaluation: str = "eval", reward: str = "2") -> str:
    return f"{answer_part}\n{MARKER}\n<evaluation>{evaluation}</evaluation>\n<reward>{reward}</reward>"


# ---------------------------------------------------------------------------------------------------
# Weights


def test_weights_defaults():
    assert DEFAULT.max_reward == 2.0
    assert DEFAULT.reward_values() == [0.0, 1.0, 2.0]


@pytest.mark.parametrize(
    ("weights", "expected_values", "expected_max"),
    [
        (RewardWeights(accuracy=2.0, format=0.5), [0.0, 0.5, 2.0, 2.5], 2.5),
        (RewardWeights(accuracy=1.0, format=0.0), [0.0, 1.0], 1.0),
        (RewardWeights(accuracy=0.0, format=1.0), [0.0, 1.0], 1.0),
        (RewardWeights(accuracy=1.5, format=1.5), [0.0, 1.5, 3.0], 3.0),
    ],
)
def test_weights_non_default(weights, expected_values, expected_max):
    assert weights.reward_values() == expected_values
    assert weights.max_reward == expected_max


@pytest.mark.parametrize(
    "kwargs",
    [
        {"accuracy": -1.0},
        {"format": math.nan},
        {"consistency": math.inf},
        {"accuracy": 0.0, "format": 0.0},
    ],
)
def test_weights_invalid_raise(kwargs):
    with pytest.raises(ValueError):
        RewardWeights(**kwargs)


# ---------------------------------------------------------------------------------------------------
# Splitting and format


def test_split_completion_with_marker():
    assert split_completion(f"a{MARKER}b{MARKER}c") == ("a", f"b{MARKER}c")


def test_split_completion_without_marker():
    assert split_completion("abc") == ("abc", None)


@pytest.mark.parametrize(
    "text",
    [
        GOOD,
        GOOD + "\n" + MARKER + POST,
        "<think>x</think><answer>y</answer>",
        "  \n<think>\nx\n</think>\n\n<answer> y </answer>\n  ",
        "<think>x</think><answer>y</answer>" + MARKER,
        "<think>x</think><answer>y</answer>" + MARKER + "garbage <answer></answer> <think>",
        "<think>a < b and b > c</think><answer>yes</answer>",
    ],
)
def test_format_accepts(text):
    assert format_reward(text) == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "14",
        "<answer>14</answer>",
        "<think>x</think>",
        "<think>x</think>14",
        "<answer>14</answer><think>x</think>",
        "<think></think><answer>14</answer>",
        "<think>  \n </think><answer>14</answer>",
        "<think>x</think><answer></answer>",
        "<think>x</think><answer> \n</answer>",
        "<think>x</think><answer>1</answer><answer>2</answer>",
        "<think>x</think><think>y</think><answer>1</answer>",
        "<think>x<think>y</think></think><answer>1</answer>",
        "<think>x</think><answer>1<answer>2</answer></answer>",
        "<think>x<answer>1</answer></think><answer>1</answer>",
        "Sure! <think>x</think><answer>1</answer>",
        "<think>x</think> so <answer>1</answer>",
        "<think>x</think><answer>1</answer> done",
        "<think>x</think><answer>1",
        "<think>x<answer>1</answer>",
        "<think>x</think><answer>1</answer><reward>2</reward>",
        "<think>x</think><answer>1</answer>" + POST,
        MARKER + "<think>x</think><answer>1</answer>",
    ],
)
def test_format_rejects(text):
    assert format_reward(text) == 0


# ---------------------------------------------------------------------------------------------------
# Answer extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD, "14"),
        (completion(GOOD), "14"),
        ("<answer>  1,200 dollars \n</answer>", "1,200 dollars"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>1</answer><answer>2", "1"),
        ("<answer>a<answer>b</answer>", "b"),
        ("<think>x</think><answer>3</answer>" + MARKER + "<answer>4</answer>", "3"),
        ("no tags here", None),
        ("<answer>14", None),
        ("14</answer>", None),
        ("<answer> </answer>", None),
        (MARKER + "<answer>4</answer>", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---------------------------------------------------------------------------------------------------
# Accuracy: numeric tasks


@pytest.mark.parametrize(
    ("answer", "reference"),
    [
        ("14", "14"),
        ("14.0", "14"),
        ("14.00", "14"),
        ("$14", "14"),
        ("14 apples", "14"),
        ("14.", "14"),
        (" 14 ", "14"),
        ("The answer is $1,200.00 dollars", "1200"),
        ("1200", "1,200"),
        ("1,200", "1200"),
        ("12,000,000", "12000000"),
        ("-3", "-3"),
        ("x = -3", "-3"),
        ("\u22123", "-3"),
        ("0.5", ".5"),
        (".5", "0.5"),
        ("1/2", "0.5"),
        ("3 / 4", "0.75"),
        ("50%", "50"),
        ("Rs.150", "150"),
        ("12 + 7 = 19, so 19 - 5 = 14", "14"),
        ("14", "Natalia sold 48/2 = 24 clips.\n#### 14"),
    ],
)
def test_numeric_accuracy_matches(answer, reference):
    assert accuracy_reward("gsm8k", answer, reference) == 1


@pytest.mark.parametrize(
    ("answer", "reference"),
    [
        ("15", "14"),
        ("-14", "14"),
        ("14", "-14"),
        ("10-3", "-3"),
        ("1.4", "14"),
        ("14 or 15", "14"),
        ("3/4", "4"),
        ("3/0", "0"),
        ("fourteen", "14"),
        ("1e3", "1000"),
        ("", "14"),
        (None, "14"),
        ("14.000001", "14"),
        ("0.30000000000000004", "0.3"),
    ],
)
def test_numeric_accuracy_rejects(answer, reference):
    assert accuracy_reward("gsm8k", answer, reference) == 0


def test_synthetic_uses_numeric_rule():
    assert accuracy_reward("synthetic", "$14.0", "14") == 1
    assert accuracy_reward("synthetic", "13", "14") == 0


def test_numeric_reference_without_number_raises():
    with pytest.raises(ValueError):
        accuracy_reward("gsm8k", "14", "no number")


def test_unknown_task_raises():
    with pytest.raises(ValueError):
        accuracy_reward("mmlu", "14", "14")


def test_unknown_task_raises_for_none_answer():
    with pytest.raises(ValueError):
        accuracy_reward("mmlu", None, "14")


# ---------------------------------------------------------------------------------------------------
# Accuracy: StrategyQA


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("yes", "yes", 1),
        ("Yes", "yes", 1),
        ("YES.", "yes", 1),
        ("yes, because Caesar had fewer children", "yes", 1),
        ("true", "yes", 1),
        ("True", "yes", 1),
        ("no", "no", 1),
        ("No!", "no", 1),
        ("false", "no", 1),
        ("**no**", "no", 1),
        ("no", "yes", 0),
        ("yes", "no", 0),
        ("false", "yes", 0),
        ("maybe", "yes", 0),
        ("I think yes", "yes", 0),
        ("yesno", "yes", 0),
        ("", "yes", 0),
        (None, "yes", 0),
        ("yes", "True", 1),
        ("no", "False", 1),
    ],
)
def test_strategyqa_accuracy(answer, reference, expected):
    assert accuracy_reward("strategyqa", answer, reference) == expected


def test_strategyqa_invalid_reference_raises():
    with pytest.raises(ValueError):
        accuracy_reward("strategyqa", "yes", "maybe")


# ---------------------------------------------------------------------------------------------------
# Accuracy: MathQA

OPTIONS = {"a": "24", "b": "120", "c": "625", "d": "1 / 2", "e": "12.5 %"}
UNIT_OPTIONS = {"a": "34 √ 3 cm 2", "b": "27 sq . m", "c": "3 : 5", "d": "0 and 3", "e": "$ 1600"}


@pytest.mark.parametrize(
    "answer",
    [
        "c", "C", "c )", "c)", "(c)", "( c )", "c.",
        "option c", "Option C", "option (c)", "c ) 625", "(c) 625",
    ],
)
def test_mathqa_letter_forms_accepted(answer):
    assert accuracy_reward("mathqa", answer, "c", OPTIONS) == 1


@pytest.mark.parametrize(
    "answer",
    ["b", "(b)", "option b", "b ) 120", "c ) 120", "cc", "c or d", "answer", "", None],
)
def test_mathqa_letter_forms_rejected(answer):
    assert accuracy_reward("mathqa", answer, "c", OPTIONS) == 0


@pytest.mark.parametrize(
    ("answer", "reference", "options"),
    [
        ("625", "c", OPTIONS),
        ("625 ways", "c", OPTIONS),
        ("625.0", "c", OPTIONS),
        ("1/2", "d", OPTIONS),
        ("0.5", "d", OPTIONS),
        ("12.5%", "e", OPTIONS),
        ("12.5", "e", OPTIONS),
        ("34 √ 3 cm 2", "a", UNIT_OPTIONS),
        ("34 √ 3   CM 2", "a", UNIT_OPTIONS),
        ("27 sq. m", "b", UNIT_OPTIONS),
        ("3:5", "c", UNIT_OPTIONS),
        ("0 and 3", "d", UNIT_OPTIONS),
        ("$1600", "e", UNIT_OPTIONS),
        ("1,600", "e", UNIT_OPTIONS),
    ],
)
def test_mathqa_value_text_accepted(answer, reference, options):
    assert accuracy_reward("mathqa", answer, reference, options) == 1


@pytest.mark.parametrize(
    ("answer", "reference", "options"),
    [
        ("120", "c", OPTIONS),
        ("24", "c", OPTIONS),
        ("1/3", "d", OPTIONS),
        ("34", "a", UNIT_OPTIONS),
        ("3", "d", UNIT_OPTIONS),
        ("5", "c", UNIT_OPTIONS),
        ("625", "c", None),
        ("625", "c", {}),
    ],
)
def test_mathqa_value_text_rejected(answer, reference, options):
    assert accuracy_reward("mathqa", answer, reference, options) == 0


def test_mathqa_letter_value_needs_options():
    # The value after the letter cannot be checked without options, so it does not count.
    assert accuracy_reward("mathqa", "c ) 625", "c", None) == 0


def test_mathqa_uppercase_reference_and_keys():
    assert accuracy_reward("mathqa", "625", " C ", {"C": "625"}) == 1


def test_mathqa_invalid_reference_raises():
    with pytest.raises(ValueError):
        accuracy_reward("mathqa", "c", "f", OPTIONS)


# ---------------------------------------------------------------------------------------------------
# True reward, predicted reward and consistency


@pytest.mark.parametrize(
    ("accuracy", "fmt", "expected"),
    [(0, 0, 0.0), (0, 1, 1.0), (1, 0, 1.0), (1, 1, 2.0)],
)
def test_true_reward_default(accuracy, fmt, expected):
    assert true_reward(accuracy, fmt, DEFAULT) == expected


def test_true_reward_weighted():
    weights = RewardWeights(accuracy=2.0, format=0.5)
    assert true_reward(1, 0, weights) == 2.0
    assert true_reward(0, 1, weights) == 0.5
    assert true_reward(1, 1, weights) == 2.5


def test_true_reward_invalid_sub_reward_raises():
    with pytest.raises(ValueError):
        true_reward(2, 1, DEFAULT)


@pytest.mark.parametrize(
    ("post_text", "expected"),
    [
        ("<reward>2</reward>", 2.0),
        ("<reward>0</reward>", 0.0),
        ("<reward> 1 </reward>", 1.0),
        ("<reward>\n1.5\n</reward>", 1.5),
        ("<reward>2.0</reward>", 2.0),
        ("<reward>.5</reward>", 0.5),
        ("<reward>1e0</reward>", 1.0),
        ("<reward>-0</reward>", 0.0),
        ("<reward>1</reward><reward>2</reward>", 1.0),
        (POST, 2.0),
    ],
)
def test_parse_predicted_reward_valid(post_text, expected):
    assert parse_predicted_reward(post_text, DEFAULT) == expected


NASTY_POST_TEXTS = [
    None,
    "",
    "2",
    "<reward></reward>",
    "<reward>   </reward>",
    "<reward>nan</reward>",
    "<reward>NaN</reward>",
    "<reward>inf</reward>",
    "<reward>-inf</reward>",
    "<reward>infinity</reward>",
    "<reward>1e309</reward>",
    "<reward>" + "9" * 5000 + "</reward>",
    "<reward>3</reward>",
    "<reward>2.0000001</reward>",
    "<reward>-1</reward>",
    "<reward>-0.5</reward>",
    "<reward>1 2</reward>",
    "<reward>1, 2</reward>",
    "<reward>1_0</reward>",
    "<reward>0x1</reward>",
    "<reward>two</reward>",
    "<reward>2 points</reward>",
    "<reward>$2</reward>",
    "<reward>1/2</reward>",
    "<reward>2",
    "<reward>",
    "</reward>2<reward>",
    "<reward><reward>2</reward>",
    "<reward>\x00</reward>",
    "<reward>\ud800</reward>",
]


@pytest.mark.parametrize("post_text", NASTY_POST_TEXTS)
def test_parse_predicted_reward_rejects_nasty(post_text):
    assert parse_predicted_reward(post_text, DEFAULT) is None


def test_parse_predicted_reward_negative_zero():
    predicted = parse_predicted_reward("<reward>-0</reward>", DEFAULT)
    assert math.copysign(1.0, predicted) == 1.0


def test_parse_predicted_reward_uses_weights_range():
    weights = RewardWeights(accuracy=2.0, format=1.0)
    assert parse_predicted_reward("<reward>3</reward>", weights) == 3.0
    assert parse_predicted_reward("<reward>3.5</reward>", weights) is None


@pytest.mark.parametrize(
    ("predicted", "true", "expected"),
    [
        (2.0, 2.0, 1.0),
        (0.0, 0.0, 1.0),
        (1.0 + 1e-12, 1.0, 1.0),
        (1.0 + 1e-6, 1.0, 0.0),
        (1.0, 2.0, 0.0),
        (2.0, 0.0, 0.0),
        (1.5, 1.0, 0.0),
        (None, 0.0, 0.0),
        (None, 2.0, 0.0),
    ],
)
def test_consistency_exact(predicted, true, expected):
    assert consistency_reward(predicted, true, DEFAULT) == expected


@pytest.mark.parametrize(
    ("predicted", "true", "expected"),
    [
        (2.0, 2.0, 1.0),
        (1.0, 2.0, 0.5),
        (0.0, 2.0, 0.0),
        (2.0, 0.0, 0.0),
        (1.5, 1.0, 0.75),
        (1.0 + 1e-12, 1.0, 1.0),
        (None, 1.0, 0.0),
    ],
)
def test_consistency_graded(predicted, true, expected):
    assert consistency_reward(predicted, true, GRADED) == pytest.approx(expected)


def test_consistency_graded_clips_to_zero():
    # A prediction outside [0, max_reward] never comes from the parser, but the rule still holds.
    assert consistency_reward(10.0, 0.0, GRADED) == 0.0


# ---------------------------------------------------------------------------------------------------
# Whole completions


def test_score_correct_and_consistent():
    text = completion(GOOD, evaluation="format: 1\naccuracy: 1\ntotal: 2", reward="2")
    assert score("synthetic", text, "14", DEFAULT) == Scores(
        accuracy=1, format=1, total=2.0, predicted=2.0, consistency=1.0, rl=3.0
    )


def test_score_wrong_answer_honest_prediction():
    text = completion(GOOD.replace("14", "15"), reward="1")
    scores = score("gsm8k", text, "14", DEFAULT)
    assert scores.accuracy == 0
    assert scores.format == 1
    assert scores.total == 1.0
    assert scores.predicted == 1.0
    assert scores.consistency == 1.0
    assert scores.rl == 2.0


def test_score_overconfident_prediction():
    text = completion("<answer>14</answer>", reward="2")
    scores = score("gsm8k", text, "14", DEFAULT)
    assert scores.accuracy == 1
    assert scores.format == 0
    assert scores.total == 1.0
    assert scores.predicted == 2.0
    assert scores.consistency == 0.0
    assert scores.rl == 1.0


def test_score_no_marker_means_no_prediction():
    scores = score("synthetic", GOOD + "<reward>2</reward>", "14", DEFAULT)
    assert scores.format == 0
    assert scores.accuracy == 1
    assert scores.predicted is None
    assert scores.consistency == 0.0
    assert scores.rl == 1.0


def test_score_reward_before_marker_ignored():
    text = GOOD + "<reward>2</reward>" + MARKER + "<evaluation>x</evaluation>"
    scores = score("synthetic", text, "14", DEFAULT)
    assert scores.predicted is None
    assert scores.consistency == 0.0


def test_score_weighted_and_graded():
    weights = RewardWeights(accuracy=2.0, format=0.5, consistency=0.5, graded_consistency=True)
    text = completion(GOOD, reward="1.5")
    scores = score("synthetic", text, "14", weights)
    assert scores.total == 2.5
    assert scores.predicted == 1.5
    assert scores.consistency == pytest.approx(0.6)
    assert scores.rl == pytest.approx(2.8)


def test_score_mathqa_with_options():
    text = completion("<think>5 ^ 4 = 625</think><answer>c ) 625</answer>", reward="2")
    scores = score("mathqa", text, "c", DEFAULT, OPTIONS)
    assert scores.accuracy == 1
    assert scores.consistency == 1.0


def test_score_garbage_never_raises():
    scores = score("strategyqa", "\x00<think><answer>" + MARKER + "<reward>nan", "yes", DEFAULT)
    assert scores == Scores(accuracy=0, format=0, total=0.0, predicted=None, consistency=0.0, rl=0.0)


# ---------------------------------------------------------------------------------------------------
# Evaluation-track text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2.0, "2"),
        (2, "2"),
        (0.0, "0"),
        (-0.0, "0"),
        (1.5, "1.5"),
        (2.5, "2.5"),
        (100.0, "100"),
        (0.1 + 0.2, "0.3"),
        (1e-7, "0.0000001"),
        (1e20, "100000000000000000000"),
        (1 / 3, "0.333333333"),
    ],
)
def test_format_number(value, expected):
    assert format_number(value) == expected


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_format_number_non_finite_raises(value):
    with pytest.raises(ValueError):
        format_number(value)


def test_render_evaluation_default_text():
    assert render_evaluation(0, 1, DEFAULT) == ("format: 1\naccuracy: 0\ntotal: 1", "1")
    assert render_evaluation(1, 1, DEFAULT) == ("format: 1\naccuracy: 1\ntotal: 2", "2")


def test_render_evaluation_names_rules_before_total():
    evaluation, _ = render_evaluation(1, 0, DEFAULT)
    assert evaluation.index("format") < evaluation.index("total")
    assert evaluation.index("accuracy") < evaluation.index("total")


def test_evaluation_template_fields_fill():
    filled = EVALUATION_TEMPLATE.format(
        format=1, accuracy=0, total="1", format_weight="1", accuracy_weight="1"
    )
    assert "{" not in filled


ROUND_TRIP_WEIGHTS = [
    DEFAULT,
    GRADED,
    RewardWeights(accuracy=2.0, format=0.5),
    RewardWeights(accuracy=0.1, format=0.2),
    RewardWeights(accuracy=1 / 3, format=1.0),
    RewardWeights(accuracy=2 / 3, format=1.0),
    RewardWeights(accuracy=2 / 3, format=1.0, graded_consistency=True),
    RewardWeights(accuracy=1.0, format=0.0),
]


@pytest.mark.parametrize("weights", ROUND_TRIP_WEIGHTS)
@pytest.mark.parametrize(("accuracy", "fmt"), [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_render_evaluation_round_trip(weights, accuracy, fmt):
    evaluation, reward_text = render_evaluation(accuracy, fmt, weights)
    text = completion(GOOD, evaluation=evaluation, reward=reward_text)
    _, post_text = split_completion(text)
    predicted = parse_predicted_reward(post_text, weights)
    true = true_reward(accuracy, fmt, weights)
    assert predicted == pytest.approx(true, abs=1e-9)
    assert consistency_reward(predicted, true, weights) == 1.0


@pytest.mark.parametrize(("accuracy", "fmt"), [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_render_evaluation_scored_completion_consistent(accuracy, fmt):
    # Build a completion whose real sub-rewards are (accuracy, fmt), then append its rendered grade.
    think = "<think>19 - 5 = 14</think>" if fmt else ""
    answer = "14" if accuracy else "15"
    evaluation, reward_text = render_evaluation(accuracy, fmt, DEFAULT)
    text = completion(f"{think}<answer>{answer}</answer>", evaluation=evaluation, reward=reward_text)
    scores = score("synthetic", text, "14", DEFAULT)
    assert scores.accuracy == accuracy
    assert scores.format == fmt
    assert scores.consistency == 1.0


# ---------------------------------------------------------------------------------------------
# Scoring never raises or hangs, whatever the model wrote


GOOD_ANSWER = "<think>12 + 7 = 19.</think><answer>19</answer>"


@pytest.mark.parametrize("prediction", ["abc", "nan", "1e999", "-3", ""])
def test_unparseable_prediction_gives_none_and_zero_consistency(prediction):
    scores = score("synthetic", f"{GOOD_ANSWER}{MARKER}<reward>{prediction}</reward>", "19", DEFAULT)
    assert scores.predicted is None
    assert scores.consistency == 0.0
    assert (scores.accuracy, scores.format) == (1, 1)


@pytest.mark.parametrize("text", [
    "<think>" * 4000,  # 28,000 characters of one unbalanced tag
    "7 + " * 5000,  # 20,000 characters of arithmetic, no tags
    GOOD_ANSWER + MARKER + "<reward>" + "1" * 20000,  # an unclosed, very long prediction
    "<answer>" + "1,000," * 3400 + "</answer>",  # a thousands-separator pattern that could backtrack
])
def test_long_repetitive_completion_scores_quickly(text):
    import time
    start = time.perf_counter()
    scores = score("gsm8k", text, "19", DEFAULT)
    assert time.perf_counter() - start < 1.0
    assert scores.rl >= 0


def test_scoring_works_off_the_main_thread():
    # nothing in scoring relies on signals (a timeout via SIGALRM only works in the main thread)
    import threading
    results = []
    thread = threading.Thread(target=lambda: results.append(score("synthetic", GOOD_ANSWER + MARKER + "<reward>2</reward>",
                                                                  "19", DEFAULT)))
    thread.start()
    thread.join(timeout=10)
    assert results and results[0].consistency == 1.0

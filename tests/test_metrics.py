"""eval.metrics on hand-made cases whose values are known."""

import itertools
import random

import pytest

from eval.metrics import (SELF_EVALUATION_METRICS, accuracy_component, auroc, expected_calibration_error, mean,
                          reward_mae, reward_prediction_accuracy, summarize)
from pcl.rewards import RewardWeights


def brute_force_auroc(scores, labels):
    """AUROC by comparing every (positive, negative) pair, ties counting half."""
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(positives, negatives))
    return wins / (len(positives) * len(negatives))


# AUROC


def test_auroc_perfect_scorer():
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0


def test_auroc_reversed_scorer():
    assert auroc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0


def test_auroc_constant_scorer():
    assert auroc([0.5] * 6, [True, False, True, False, False, True]) == 0.5


def test_auroc_random_scorer_near_half():
    rng = random.Random(0)
    labels = [rng.random() < 0.5 for _ in range(4000)]
    scores = [rng.random() for _ in labels]
    assert abs(auroc(scores, labels) - 0.5) < 0.03


def test_auroc_known_value():
    # pairs (positive, negative): 3>1, 3>2, 2=2 (half), 2>1 -> 3.5 of 4
    assert auroc([3, 2, 2, 1], [True, True, False, False]) == 0.875


def test_auroc_matches_pairwise_count():
    rng = random.Random(1)
    for _ in range(20):
        labels = [rng.random() < 0.3 for _ in range(40)] + [True, False]
        scores = [rng.choice([0.0, 0.5, 1.0, rng.random()]) for _ in labels]
        assert auroc(scores, labels) == pytest.approx(brute_force_auroc(scores, labels))


def test_auroc_one_class_is_none():
    assert auroc([0.2, 0.9], [True, True]) is None
    assert auroc([], []) is None


# expected calibration error


def test_ece_calibrated_scorer_is_zero():
    # in each bin the share of right answers equals the predicted probability
    probabilities = [0.1] * 10 + [0.5] * 10 + [0.9] * 10
    labels = [True] * 1 + [False] * 9 + [True] * 5 + [False] * 5 + [True] * 9 + [False] * 1
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.0, abs=1e-12)


def test_ece_sampled_calibrated_scorer_near_zero():
    rng = random.Random(0)
    probabilities = [rng.random() for _ in range(20000)]
    labels = [rng.random() < p for p in probabilities]
    assert expected_calibration_error(probabilities, labels) < 0.02


def test_ece_overconfident_constant():
    # always 0.9 sure, right 60% of the time
    assert expected_calibration_error([0.9] * 10, [True] * 6 + [False] * 4) == pytest.approx(0.3)


def test_ece_weights_bins_by_rows():
    # bin [0.2, 0.3): 4 rows at 0.25, none right, gap 0.25; bin [0.9, 1]: 1 row at 1.0, right, gap 0
    assert expected_calibration_error([0.25] * 4 + [1.0], [False] * 4 + [True]) == pytest.approx(0.8 * 0.25)


def test_ece_hard_predictions_equal_error_rate():
    probabilities = [1.0, 1.0, 1.0, 0.0, 0.0]
    labels = [True, True, False, False, True]
    assert expected_calibration_error(probabilities, labels) == pytest.approx(2 / 5)


def test_ece_bin_edges():
    # 0.1 belongs to the second of ten bins, 1.0 to the last; one bin takes everything
    assert expected_calibration_error([0.1, 1.0], [False, True], bins=10) == pytest.approx(0.05)
    assert expected_calibration_error([0.1, 1.0], [False, True], bins=1) == pytest.approx(abs(0.5 - 0.55))


def test_ece_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        expected_calibration_error([1.2], [True])
    with pytest.raises(ValueError, match="bins"):
        expected_calibration_error([0.5], [True], bins=0)
    with pytest.raises(ValueError, match="one per row"):
        expected_calibration_error([0.5, 0.5], [True])
    assert expected_calibration_error([], []) is None


# reward prediction


def test_reward_prediction_accuracy_counts_missing_as_wrong():
    assert reward_prediction_accuracy([2.0, 1.0, None, 0.0], [2.0, 2.0, 1.0, 0.0]) == 0.5


def test_reward_prediction_accuracy_tolerance():
    assert reward_prediction_accuracy([1.0000000001, 1.1], [1.0, 1.0]) == 0.5


def test_reward_mae_skips_missing():
    assert reward_mae([2.0, 1.0, None, 0.5], [2.0, 2.0, 1.0, 0.0]) == pytest.approx((0 + 1 + 0.5) / 3)


def test_reward_mae_without_predictions():
    assert reward_mae([None, None], [1.0, 2.0]) is None


def test_mean():
    assert mean([1, 2, 6]) == 3
    assert mean([]) is None


# probability of correctness


@pytest.mark.parametrize("reward, fmt, expected", [
    (2.0, 1, 1.0), (1.0, 1, 0.0), (1.0, 0, 1.0), (0.0, 0, 0.0),
    (1.5, 1, 0.5),  # between the possible values
    (0.0, 1, 0.0),  # below the lowest value for this format, clipped
])
def test_accuracy_component(reward, fmt, expected):
    assert accuracy_component(reward, fmt, RewardWeights()) == expected


def test_accuracy_component_other_weights():
    assert accuracy_component(2.5, 1, RewardWeights(accuracy=2.0, format=0.5)) == 1.0
    assert accuracy_component(0.5, 1, RewardWeights(accuracy=2.0, format=0.5)) == 0.0
    assert accuracy_component(1.0, 1, RewardWeights(accuracy=0.0, format=1.0)) is None


# summarize


def record(accuracy, fmt, tokens, predicted, probability):
    return {"accuracy": accuracy, "format": fmt, "tokens": tokens, "reward": accuracy + fmt,
            "predicted_reward": predicted, "correct_probability": probability}


RECORDS = [
    record(1, 1, 20, 2.0, 0.9),
    record(0, 1, 30, 2.0, 0.8),
    record(0, 1, 25, 1.0, 0.2),
    record(1, 0, 40, None, None),
]


def test_summarize_known_values():
    metrics = summarize(RECORDS)
    assert metrics["eval_examples"] == 4
    assert metrics["accuracy"] == 0.5
    assert metrics["format_rate"] == 0.75
    assert metrics["tokens_per_answer"] == 28.75
    assert metrics["reward_prediction_accuracy"] == 0.5
    assert metrics["prediction_rate"] == 0.75
    assert metrics["reward_mae"] == pytest.approx(1 / 3)
    assert metrics["correctness_auroc"] == 1.0  # 0.9 above 0.8 and 0.2
    # bins: 0.9 (right), 0.8 (wrong), 0.2 (wrong)
    assert metrics["correctness_ece"] == pytest.approx((0.1 + 0.8 + 0.2) / 3)


def test_summarize_without_post_completion():
    metrics = summarize([record(1, 1, 20, None, None), record(0, 1, 22, None, None)], post_completion=False)
    assert metrics["accuracy"] == 0.5
    assert metrics["tokens_per_answer"] == 21
    for key in SELF_EVALUATION_METRICS:
        assert metrics[key] is None, key


def test_summarize_rejects_no_records():
    with pytest.raises(ValueError, match="empty"):
        summarize([])

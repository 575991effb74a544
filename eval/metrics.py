"""Held-out metrics: answer quality at inference cost, then self-evaluation quality.

Pure functions on plain Python values, so they can be tested on hand-made cases. summarize()
turns the per-row records of eval.evaluate.answer_and_grade into the metrics that summary.json,
`python -m eval.evaluate` and the tables report:

- accuracy, format_rate: shares of answers whose accuracy or format reward is 1.
- tokens_per_answer: mean number of ids generated per answer, the stop id included. The stop id is
  `<post-completion>` for a PCL model and EOS for a model trained without post-completion, so both
  count the same thing: the answer and the one id that ends it. A row cut by the length limit
  counts the limit.
- reward_prediction_accuracy: share of rows whose predicted reward equals the true reward. A row
  without a parsable prediction counts as wrong.
- prediction_rate: share of rows with a parsable predicted reward.
- reward_mae: mean absolute error of the predicted reward, over the rows with a prediction.
- correctness_auroc: AUROC of the predicted probability of correctness for telling right answers
  from wrong ones, over the rows with a probability.
- correctness_ece: expected calibration error of that probability, ECE_BINS equal-width bins.

The self-evaluation metrics are None for a model trained without post-completion, which has
nothing to measure there, and None where their rows are missing, such as AUROC without both a
right and a wrong answer.
"""

from collections.abc import Sequence

from pcl.rewards import REWARD_TOLERANCE, RewardWeights

# Equal-width bins of [0, 1] for the expected calibration error. Ten bins keep about 20 rows per
# bin in a 200-row evaluation when the probabilities spread evenly.
ECE_BINS = 10

# The keys that summarize() sets to None for a model without post-completion.
SELF_EVALUATION_METRICS = ("reward_prediction_accuracy", "prediction_rate", "reward_mae", "correctness_auroc",
                           "correctness_ece")


def mean(values: Sequence[float]) -> float | None:
    """Return the arithmetic mean, or None for no values."""
    if not values:
        return None
    return sum(values) / len(values)


def accuracy_component(reward: float, fmt: int, weights: RewardWeights) -> float | None:
    """Return the accuracy sub-reward that `reward` implies for an answer of format reward `fmt`.

    r = w_acc * r_acc + w_fmt * r_fmt, so r_acc = (r - w_fmt * r_fmt) / w_acc, clipped to [0, 1]
    for rewards between the possible values. The format reward is a rule on the visible text, so
    the part of a predicted reward that is a judgement is its accuracy part. Returns None when
    w_acc is 0, because then the reward says nothing about accuracy.
    """
    if weights.accuracy == 0:
        return None
    value = (reward - weights.format * fmt) / weights.accuracy
    return min(1.0, max(0.0, value))


def reward_prediction_accuracy(predicted: Sequence[float | None], true: Sequence[float]) -> float | None:
    """Share of rows whose prediction equals the true reward within REWARD_TOLERANCE.

    A None prediction (nothing parsable) counts as wrong. Returns None for no rows.
    """
    _check_lengths(predicted, true)
    if not true:
        return None
    hits = sum(p is not None and abs(p - t) <= REWARD_TOLERANCE for p, t in zip(predicted, true))
    return hits / len(true)


def reward_mae(predicted: Sequence[float | None], true: Sequence[float]) -> float | None:
    """Mean absolute error |predicted - true| over the rows with a prediction; None if there are none."""
    _check_lengths(predicted, true)
    return mean([abs(p - t) for p, t in zip(predicted, true) if p is not None])


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Compute the area under the ROC curve of `scores` for telling label True from False.

    It is the probability that a random positive scores above a random negative, with ties
    counting half: 1 for a perfect scorer, 0 for a reversed one, 0.5 for a constant one. Returns
    None when one class is absent.
    """
    _check_lengths(scores, labels)
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    if not positives or not negatives:
        return None
    # rank-sum (Mann-Whitney U) form: O(n log n) instead of comparing every pair
    ordered = sorted(scores)
    ranks = {}  # score -> mean 1-based rank of its ties
    start = 0
    while start < len(ordered):
        end = start
        while end < len(ordered) and ordered[end] == ordered[start]:
            end += 1
        ranks[ordered[start]] = (start + 1 + end) / 2
        start = end
    rank_sum = sum(ranks[s] for s in positives)
    n_pos, n_neg = len(positives), len(negatives)
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def expected_calibration_error(probabilities: Sequence[float], labels: Sequence[bool],
                               bins: int = ECE_BINS) -> float | None:
    """Compute the expected calibration error of predicted probabilities that the label is True.

    The probabilities fall into `bins` equal-width bins of [0, 1], the last one closed. ECE is the
    mean over bins of |share of True labels - mean probability|, each bin weighted by its share of
    the rows. A scorer whose probability p comes true in a share p of its rows scores 0; a constant
    0.9 on rows that are 60% True scores 0.3. Returns None for no rows. Raises ValueError for a
    probability outside [0, 1].
    """
    _check_lengths(probabilities, labels)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if not probabilities:
        return None
    totals = [[0, 0.0, 0] for _ in range(bins)]  # per bin: rows, sum of probabilities, True labels
    for p, y in zip(probabilities, labels):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability {p!r} is outside [0, 1]")
        index = min(int(p * bins), bins - 1)
        totals[index][0] += 1
        totals[index][1] += p
        totals[index][2] += bool(y)
    n = len(probabilities)
    return sum(count / n * abs(positives / count - probability_sum / count)
               for count, probability_sum, positives in totals if count)


def summarize(records: list[dict], post_completion: bool = True) -> dict:
    """Compute the held-out metrics from the records of eval.evaluate.answer_and_grade.

    Each record has `accuracy` and `format` (0 or 1), `tokens`, `reward` (the true reward),
    `predicted_reward` (None without a prediction) and `correct_probability` (None without one).
    """
    if not records:
        raise ValueError("no records to summarize: the held-out split is empty")
    metrics = {
        "eval_examples": len(records),
        "accuracy": mean([r["accuracy"] for r in records]),
        "format_rate": mean([r["format"] for r in records]),
        "tokens_per_answer": mean([r["tokens"] for r in records]),
    }
    if not post_completion:
        return {**metrics, **dict.fromkeys(SELF_EVALUATION_METRICS)}

    predicted = [r["predicted_reward"] for r in records]
    true = [r["reward"] for r in records]
    scored = [r for r in records if r["correct_probability"] is not None]
    probabilities = [r["correct_probability"] for r in scored]
    labels = [bool(r["accuracy"]) for r in scored]
    return {
        **metrics,
        "reward_prediction_accuracy": reward_prediction_accuracy(predicted, true),
        "prediction_rate": mean([p is not None for p in predicted]),
        "reward_mae": reward_mae(predicted, true),
        "correctness_auroc": auroc(probabilities, labels),
        "correctness_ece": expected_calibration_error(probabilities, labels),
    }


def _check_lengths(first: Sequence, second: Sequence):
    if len(first) != len(second):
        raise ValueError(f"got {len(first)} values but {len(second)} labels or targets; pass one per row")

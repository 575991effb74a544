"""Held-out evaluation: answer accuracy at inference cost, then self-evaluation quality.

Pass 1 generates greedily with `<post-completion>` and EOS as stop ids, exactly as a deployed model
runs, and measures accuracy, format rate and tokens per answer. Pass 2 continues the rows that
reached the marker up to EOS, which only evaluation does, and compares the predicted reward with the
true one.
"""

import torch

from data import Row, format_prompt
from model.generate import generate
from model.tokenizer import Tokenizer
from pcl import rewards
from pcl.sequence import prompt_ids


def auroc(scores: list[float], labels: list[bool]) -> float | None:
    """Compute the area under the ROC curve of `scores` for telling label True from False.

    Ties count half. Returns None when one class is absent.
    """
    positives = [s for s, y in zip(scores, labels) if y]
    negatives = [s for s, y in zip(scores, labels) if not y]
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@torch.no_grad()
def evaluate(model, tok: Tokenizer, task: str, rows: list[Row], weights: rewards.RewardWeights,
             batch_size: int = 64, max_new_tokens: int = 96, max_evaluation_tokens: int = 48):
    """Returns (metrics dict, one record per row)."""
    records = answer_and_grade(model, tok, task, rows, weights, batch_size, max_new_tokens, max_evaluation_tokens)
    return summarize(records), records


@torch.no_grad()
def answer_and_grade(model, tok: Tokenizer, task: str, rows: list[Row], weights: rewards.RewardWeights,
                     batch_size: int = 64, max_new_tokens: int = 96, max_evaluation_tokens: int = 48) -> list[dict]:
    """Answer `rows` greedily, continue the answers past the marker, and grade them: one record per
    row. Processes of a data-parallel run each call it on their part of the rows."""
    was_training = model.training
    model.eval()
    records = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        prompts = [prompt_ids(tok, format_prompt(task, row)) for row in batch]
        answers = generate(model, prompts, max_new_tokens, stop_ids=[tok.marker_id, tok.eos_id],
                           pad_id=tok.pad_id, temperature=0.0)
        at_marker = [i for i, ids in enumerate(answers.tokens) if ids and ids[-1] == tok.marker_id]
        post = {}
        if at_marker:
            continued = generate(model, [prompts[i] + answers.tokens[i] for i in at_marker], max_evaluation_tokens,
                                 stop_ids=[tok.eos_id], pad_id=tok.pad_id, temperature=0.0)
            post = {i: tok.decode_completion(ids) for i, ids in zip(at_marker, continued.tokens)}
        for i, row in enumerate(batch):
            answer_text = tok.decode_completion(answers.tokens[i])
            full_text = answer_text + post.get(i, "")
            scores = rewards.score(task, full_text, row.answer, weights, row.options)
            records.append({
                "source": row.source,
                "reference": row.answer,
                "completion": answer_text,
                "post_completion": post.get(i),
                "tokens": len(answers.tokens[i]),
                "accuracy": scores.accuracy,
                "format": scores.format,
                "reward": scores.total,
                "predicted_reward": scores.predicted,
            })
    model.train(was_training)
    return records


def summarize(records: list[dict]) -> dict:
    """Compute the held-out metrics from the records of answer_and_grade."""
    n = len(records)
    predicted = [r for r in records if r["predicted_reward"] is not None]
    metrics = {
        "eval_examples": n,
        "accuracy": sum(r["accuracy"] for r in records) / n,
        "format_rate": sum(r["format"] for r in records) / n,
        "tokens_per_answer": sum(r["tokens"] for r in records) / n,
        # a row without a parsable prediction counts as a wrong prediction
        "reward_prediction_accuracy": sum(abs(r["predicted_reward"] - r["reward"]) < 1e-9 for r in predicted) / n,
        "prediction_rate": len(predicted) / n,
        "reward_mae": (sum(abs(r["predicted_reward"] - r["reward"]) for r in predicted) / len(predicted)
                       if predicted else None),
        # does a higher predicted reward go with a right answer?
        "correctness_auroc": auroc([r["predicted_reward"] for r in predicted], [bool(r["accuracy"]) for r in predicted]),
    }
    return metrics

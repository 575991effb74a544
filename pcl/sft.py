"""Dual-track SFT: the reasoning track and the evaluation track.

Reasoning track: (prompt, gold completion, marker), trained on the completion and the marker.
Evaluation track: (prompt, a completion that may be wrong, marker, evaluation, reward, eos), trained
only after the marker, so a wrong completion is graded but never imitated. Its completions come from
the model's own samples, scored by the reward rules; for a cold start, gold completions and
corrupted gold completions supply both classes.

    L_sft = L_reason + lambda_eval * L_eval + lambda_score * L_score

with L_score the score regression of pcl.losses.
"""

import random
from collections.abc import Callable
from contextlib import nullcontext
import re
from collections import deque
from dataclasses import dataclass

import torch

from data import Row, format_prompt
from model.tokenizer import ANSWER, ANSWER_END, THINK, THINK_END, Tokenizer
from pcl import rewards
from pcl.losses import (masked_cross_entropy, score_regression_fused, score_regression_reference,
                        token_cross_entropy_reference, use_chunked_cross_entropy)
from pcl.sequence import (EVALUATION_TRACK, REASONING_TRACK, Segment, Sequence, collate, completion_text,
                          evaluation_track, first_score_mask, prompt_ids, target_mask)


@dataclass
class SFTConfig:
    batch_size: int = 16  # reasoning-track sequences per step
    eval_batch_size: int = 16  # evaluation-track sequences per step, half from each class when possible
    lambda_eval: float = 1.0
    lambda_score: float = 1.0
    pool_size: int = 128  # evaluation-track examples kept; the newest replace the oldest
    balance: bool = False  # draw half right, half wrong answers instead of the pool's ratio


@dataclass
class EvalExample:
    sequence: Sequence
    reward: float  # true total reward r: the score-regression target
    correct: bool  # accuracy sub-reward is 1: the class that sampling balances


def gold_completion(row: Row) -> str:
    return completion_text(row.reasoning, row.answer)


_NUMBER = re.compile(r"\d+")


def corrupt_completion(task: str, row: Row, rng: random.Random) -> str:
    """A plausible wrong completion of `row` for the evaluation track's cold start.

    Half the time the answer is changed (for numbers, the final result is changed consistently in
    the reasoning too, so the grader must check the arithmetic rather than compare two numbers);
    otherwise a tag is broken, which fails the format rule.
    """
    if rng.random() < 0.5:
        if task == "strategyqa":
            wrong = "no" if row.answer == "yes" else "yes"
            return completion_text(row.reasoning, wrong)
        if task == "mathqa":
            letters = [k for k in (row.options or {}) if k != row.answer] or ["a"]
            return completion_text(row.reasoning, rng.choice(letters))
        if _NUMBER.fullmatch(row.answer):
            value = int(row.answer)
            wrong = str(max(0, value + rng.choice([-1, 1]) * rng.randint(1, 9)))
            if wrong == row.answer:
                wrong = str(value + 1)
            head, sep, tail = row.reasoning.rpartition(row.answer)
            reasoning = head + wrong + tail if sep else row.reasoning
            return completion_text(reasoning, wrong)
        return completion_text(row.reasoning, row.answer + "0")
    breakages = [
        lambda: f"{THINK}{row.reasoning}{THINK_END}{ANSWER}{row.answer}",  # unclosed answer
        lambda: f"{row.reasoning}{ANSWER}{row.answer}{ANSWER_END}",  # no think block
        lambda: f"{THINK}{row.reasoning}{THINK_END}{ANSWER}{ANSWER_END}",  # empty answer
        lambda: f"{THINK}{THINK_END}{ANSWER}{row.answer}{ANSWER_END}",  # empty think
    ]
    return rng.choice(breakages)()


class EvaluationTrack:
    """The newest `pool_size` evaluation-track examples, graded by the reward rules.

    With `balance`, a batch is half right and half wrong answers; without it, examples are drawn
    at the pool's own ratio, which teaches the grader the base rate of its own mistakes. stats()
    reports the ratio either way.
    """

    def __init__(self, tok: Tokenizer, task: str, weights: rewards.RewardWeights, pool_size: int,
                 balance: bool = False):
        self.tok, self.task, self.weights, self.balance = tok, task, weights, balance
        self.pool = deque(maxlen=pool_size)
        self.added = {"cold_start": 0, "samples": 0}

    def add(self, row: Row, prompt: list[int], completion: list[int], source: str = "samples") -> EvalExample:
        """Score `completion` (ids before the marker) with the reward rules and store it graded."""
        scores = rewards.score(self.task, self.tok.decode_completion(completion), row.answer, self.weights, row.options)
        evaluation, reward = rewards.render_evaluation(scores.accuracy, scores.format, self.weights)
        sequence = evaluation_track(self.tok, prompt, completion, evaluation, reward)
        example = EvalExample(sequence, scores.total, bool(scores.accuracy))
        self.pool.append(example)
        self.added[source] += 1
        return example

    def cold_start(self, rows: list[Row], rng: random.Random):
        """Fill the pool from gold completions (right) and corrupted ones (wrong)."""
        for row in rows:
            prompt = prompt_ids(self.tok, format_prompt(self.task, row))
            for text in (gold_completion(row), corrupt_completion(self.task, row, rng)):
                self.add(row, prompt, self.tok.encode(text), source="cold_start")

    def sample(self, n: int, rng: random.Random) -> list[EvalExample]:
        if not self.pool:
            return []
        right = [e for e in self.pool if e.correct]
        wrong = [e for e in self.pool if not e.correct]
        if not self.balance or not right or not wrong:
            return [rng.choice(self.pool) for _ in range(n)]
        half = n // 2
        return [rng.choice(right) for _ in range(n - half)] + [rng.choice(wrong) for _ in range(half)]

    def state_dict(self) -> dict:
        """Return the pool and the counters as JSON-serialisable values, for checkpoints."""
        pool = [{"input_ids": e.sequence.input_ids, "segment_ids": e.sequence.segment_ids, "reward": e.reward,
                 "correct": e.correct} for e in self.pool]
        return {"pool": pool, "added": dict(self.added)}

    def load_state_dict(self, state: dict):
        """Replace the pool and the counters with those of state_dict()."""
        self.pool.clear()
        for e in state["pool"]:
            self.pool.append(EvalExample(Sequence(list(e["input_ids"]), list(e["segment_ids"])), e["reward"],
                                         bool(e["correct"])))
        self.added = dict(state["added"])

    def stats(self) -> dict:
        right = sum(e.correct for e in self.pool)
        return {"pool_right": right, "pool_wrong": len(self.pool) - right,
                **{f"added_{k}": v for k, v in self.added.items()}}


class ScoreHead:
    """Candidate score tokens and their values, for the score regression.

    Every value the true reward can take must be a single token, so that the position before
    the score predicts the whole score.
    """

    def __init__(self, tok: Tokenizer, weights: rewards.RewardWeights, device):
        values = weights.reward_values()
        ids = []
        for value in values:
            encoded = tok.encode(rewards.format_number(value))
            if len(encoded) != 1:
                raise ValueError(
                    f"reward value {rewards.format_number(value)!r} is {len(encoded)} tokens; score regression "
                    "needs one token per value: choose reward weights (--w-acc, --w-fmt) whose sums are one "
                    "token each, or set --lambda-score 0"
                )
            ids.append(encoded[0])
        self.ids = torch.tensor(ids, device=device)  # (K,)
        self.values = torch.tensor(values, dtype=torch.float32, device=device)  # (K,)


def sft_counts(reasoning: list[Sequence], evaluation: list[EvalExample]) -> dict[str, int]:
    """Count the normalisers of the three SFT terms from segment ids, over a whole step:
    reasoning-track targets, evaluation-track targets, and evaluation rows with a score."""
    def targets(sequences, segments):
        wanted = {int(s) for s in segments}
        return sum(sum(s in wanted for s in seq.segment_ids[1:]) for seq in sequences)

    scored = [e.sequence for e in evaluation if int(Segment.SCORE) in e.sequence.segment_ids[1:]]
    return {"reason": targets(reasoning, REASONING_TRACK),
            "eval": targets([e.sequence for e in evaluation], EVALUATION_TRACK), "score": len(scored)}


def sft_loss(model, reasoning: list[Sequence], evaluation: list[EvalExample], score_head: ScoreHead | None,
             cfg: SFTConfig, pad_id: int, compile: bool = True, reference: bool = False,
             counts: dict[str, int] | None = None):
    """L_sft over one batch of both tracks in a single forward pass; returns (loss, stats).

    Each term is a sum over its valid positions divided by `counts` (from sft_counts), the step's
    normalisers; by default they are counted on this batch, so each term is a mean over its own
    positions. `reference` uses the eager reference losses instead of the chunked cross-entropy (which
    only large logits take) and the fused score regression; `compile` runs those two through
    torch.compile.
    """
    device = next(model.parameters()).device  # also when a DistributedDataParallel wraps the model
    counts = counts or sft_counts(reasoning, evaluation)
    sequences = reasoning + [e.sequence for e in evaluation]
    input_ids, segment_ids = collate(sequences, pad_id, device)  # (B, T)
    is_reasoning_row = torch.zeros(len(sequences), dtype=torch.bool, device=device)
    is_reasoning_row[:len(reasoning)] = True
    logits = model(input_ids)[:, :-1]  # (B, T-1, V)
    targets = input_ids[:, 1:]

    # the evaluation track's completion is REASONING too, so each track's rows are selected explicitly
    reason_mask = target_mask(segment_ids, REASONING_TRACK) & is_reasoning_row[:, None]
    eval_mask = target_mask(segment_ids, EVALUATION_TRACK) & ~is_reasoning_row[:, None]
    if reference or not use_chunked_cross_entropy(logits):
        sum_reason = token_cross_entropy_reference(logits, targets, reason_mask)
        sum_eval = token_cross_entropy_reference(logits, targets, eval_mask)
    else:
        # one call for both tracks, so the backward allocates a single (B, T-1, V) gradient
        per_position = masked_cross_entropy(logits, targets, reason_mask | eval_mask, compile)  # (M,)
        is_reason = reason_mask[reason_mask | eval_mask]  # (M,)
        sum_reason, sum_eval = per_position[is_reason].sum(), per_position[~is_reason].sum()
    loss_reason = sum_reason / max(counts["reason"], 1)
    loss_eval = sum_eval / max(counts["eval"], 1)

    loss_score = torch.zeros((), device=device)
    if score_head is not None and evaluation and cfg.lambda_score > 0:
        score_mask = first_score_mask(segment_ids) & ~is_reasoning_row[:, None]
        score_targets = torch.tensor([0.0] * len(reasoning) + [e.reward for e in evaluation], device=device)
        regression = score_regression_reference if reference else score_regression_fused
        kwargs = {} if reference else {"compile": compile}
        loss_score = regression(logits, score_mask, score_head.ids, score_head.values, score_targets, **kwargs)
        loss_score = loss_score / max(counts["score"], 1)

    loss = loss_reason + cfg.lambda_eval * loss_eval + cfg.lambda_score * loss_score
    stats = {"sft_reason": loss_reason.item(), "sft_eval": loss_eval.item(), "sft_score": loss_score.item(),
             "sft_tokens": int(reason_mask.sum() + eval_mask.sum())}
    return loss, stats


def sft_backward(model, reasoning: list[Sequence], evaluation: list[EvalExample], score_head: ScoreHead | None,
                 cfg: SFTConfig, pad_id: int, micro_batch_size: int = 0, scale: float = 1.0,
                 compile: bool = True, autocast=None, reduce: Callable[[list[float]], list[float]] | None = None) -> dict:
    """Run forward and backward of scale * L_sft in micro-batches of `micro_batch_size` rows (0: one pass);
    the gradients accumulate in the parameters. The normalisers are counted over the whole batch
    first, so the gradient does not depend on the split. Returns the step's statistics.

    In data-parallel training, `reduce` sums a list of numbers over the processes, so that the
    normalisers and the statistics are those of the whole step's batch, not of this process's part.
    """
    reduce = reduce or list
    local = sft_counts(reasoning, evaluation)
    counts = dict(zip(local, (int(c) for c in reduce(list(local.values())))))
    items = [(True, r) for r in reasoning] + [(False, e) for e in evaluation]
    size = micro_batch_size or len(items)
    total = {"sft_loss": 0.0, "sft_reason": 0.0, "sft_eval": 0.0, "sft_score": 0.0, "sft_tokens": 0}
    for start in range(0, len(items), size):
        chunk = items[start:start + size]
        with autocast or nullcontext():  # the forward pass only, not the backward
            loss, stats = sft_loss(model, [x for is_r, x in chunk if is_r], [x for is_r, x in chunk if not is_r],
                                   score_head, cfg, pad_id, compile=compile, counts=counts)
        (scale * loss).backward()
        total["sft_loss"] += loss.item()
        for key, value in stats.items():
            total[key] += value
    total = dict(zip(total, reduce(list(total.values()))))
    total["sft_tokens"] = int(total["sft_tokens"])
    return total

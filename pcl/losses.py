"""Losses as pure functions of (logits, targets, masks).

Each returns a *sum* over its valid positions, and the caller divides each sum by its own count
of valid positions, so each term of the objective is a mean over the tokens it trains on.

Shapes: B batch, T target positions (the sequence length minus one), V vocabulary, K candidate
score values.
"""

import logging

import torch
import torch.nn.functional as F

from model.generate import sampling_logprobs

log = logging.getLogger(__name__)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the masked targets. logits (B, T, V), targets and mask (B, T)."""
    # select the valid positions first: masked-out positions never enter the sum, even as NaN
    return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) fp32 log-probability of each target, under the same temperature as the sampler."""
    return sampling_logprobs(logits, temperature).gather(-1, targets[..., None]).squeeze(-1)


def distribution_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """(...,) entropy in nats of each distribution given as log-probabilities (..., V)."""
    return -(logprobs.exp() * logprobs).sum(-1)


# ---------------------------------------------------------------------------------------------
# Score regression: the expected score under the model's distribution, regressed to the true reward


def score_regression_reference(logits, score_mask, candidate_ids, candidate_values, targets):
    """Eager reference: summed squared error between E[score] and the true reward.

    logits (B, T, V); score_mask (B, T) bool, at most one True per row (the position that predicts
    the score token); candidate_ids (K,) ids of the score tokens, candidate_values (K,) their values;
    targets (B,) true rewards. E[score] = sum_k p_k v_k with p the softmax over the full vocabulary,
    so probability on non-score tokens counts as predicting 0 and is pushed onto the candidates.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # (B, T, V): the tensor the fused path avoids
    expected = (probs[..., candidate_ids] * candidate_values).sum(-1)  # (B, T)
    error = (expected - targets[:, None].float()) ** 2
    return torch.where(score_mask, error, torch.zeros_like(error)).sum()


def _score_regression_rows(rows, candidate_ids, candidate_values, targets):
    """rows (N, V) logits at the score positions; one logsumexp and one gather per row."""
    rows = rows.float()
    log_normalizer = torch.logsumexp(rows, dim=-1, keepdim=True)  # (N, 1)
    probs = torch.exp(rows[:, candidate_ids] - log_normalizer)  # (N, K)
    expected = probs @ candidate_values.float()  # (N,)
    return ((expected - targets.float()) ** 2).sum()


class _MaybeCompiled:
    """A function run through torch.compile, falling back to eager (with one warning) where
    compilation is unavailable or disabled."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True)
        self.enabled = True

    def __call__(self, *args):
        if self.enabled:
            try:
                return self.compiled(*args)
            except Exception as e:  # compiler missing or unsupported op: eager gives the same result
                log.warning("torch.compile failed for %s, using eager: %s", self.fn.__name__, e)
                self.enabled = False
        return self.fn(*args)


_score_regression_rows_compiled = _MaybeCompiled(_score_regression_rows)


def score_regression_fused(logits, score_mask, candidate_ids, candidate_values, targets, compile: bool = True):
    """Same value and gradient as score_regression_reference, without a (B, T, V) probability tensor:
    the score positions are gathered first and each one costs a logsumexp over V."""
    rows, cols = score_mask.nonzero(as_tuple=True)
    if len(rows) == 0:
        return logits.flatten()[:0].sum()  # exactly 0, even with inf logits, and backward still works
    selected = logits[rows, cols]  # (N, V)
    fn = _score_regression_rows_compiled if compile else _score_regression_rows
    return fn(selected, candidate_ids, candidate_values, targets[rows])


# ---------------------------------------------------------------------------------------------
# GRPO


def grpo_token_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_eps: float, kl_coef: float):
    """Per-token GRPO loss (B, T), zero outside mask, and per-token statistics.

    Clipped surrogate of PPO (Schulman et al. 2017): -min(ratio * A, clip(ratio, 1 +- eps) * A),
    plus kl_coef times the k3 estimator of KL(policy || reference) (Schulman 2020,
    "Approximating KL divergence"): exp(ref - logp) - (ref - logp) - 1, which is unbiased and >= 0.
    All inputs (B, T); old_logprobs come from the sampler, ref_logprobs from the frozen reference
    (None when kl_coef is 0).
    """
    zeros = torch.zeros_like(logprobs)
    # masked slots may hold anything (padding log-probs): select them away before any arithmetic
    old_logprobs = torch.where(mask, old_logprobs, logprobs.detach())
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    surrogate = torch.minimum(ratio * advantages, clipped * advantages)
    loss = -surrogate
    kl = zeros
    if ref_logprobs is not None and kl_coef > 0:
        ref_logprobs = torch.where(mask, ref_logprobs, logprobs.detach())
        log_ratio = ref_logprobs - logprobs
        kl = torch.exp(log_ratio) - log_ratio - 1
        loss = loss + kl_coef * kl
    loss = torch.where(mask, loss, zeros)
    with torch.no_grad():
        stats = {
            "kl": torch.where(mask, kl, zeros).sum(),
            "clipped": torch.where(mask, ((ratio - clipped).abs() > 0).float(), zeros).sum(),
            "ratio": torch.where(mask, ratio, zeros).sum(),
        }
    return loss, stats

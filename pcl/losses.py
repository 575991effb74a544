"""Losses as pure functions of (logits, targets, masks).

Each returns a *sum* over its valid positions, and the caller divides each sum by its own count
of valid positions, so each term of the objective is a mean over the tokens it trains on.

Shapes: B batch, T target positions (the sequence length minus one), V vocabulary, K candidate
score values.
"""

import torch
import torch.nn.functional as F

from model.compiled import MaybeCompiled
from model.generate import sampling_logprobs


def token_cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eager reference: summed cross-entropy of the masked targets. logits (B, T, V), targets and
    mask (B, T)."""
    # select the valid positions first: masked-out positions never enter the sum, even as NaN
    return F.cross_entropy(logits[mask].float(), targets[mask], reduction="sum")


# Logits from which token_cross_entropy and the SFT loss chunk: 2^22 is 16 MiB in fp32. The chunked
# path was 2.3x to 2.9x faster than the plain one from 5.9M to 16.8M logits on the 2-core Intel
# machine of BENCHMARKS.md, but it rounds differently. The default run's logits (at most 32 x 160 x 420, 2.2M)
# stay below, so its arithmetic, and the numbers in RESULTS.md, stay those of F.cross_entropy.
CHUNKED_CROSS_ENTROPY_MIN_LOGITS = 2 ** 22


def use_chunked_cross_entropy(logits: torch.Tensor) -> bool:
    return logits.numel() >= CHUNKED_CROSS_ENTROPY_MIN_LOGITS


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                        compile: bool = True) -> torch.Tensor:
    """Same value and gradient as token_cross_entropy_reference. Large logits go through
    masked_cross_entropy in chunks of rows, so no (B, T, V) softmax or log-softmax is ever stored;
    smaller ones through the reference itself."""
    if not use_chunked_cross_entropy(logits):
        return token_cross_entropy_reference(logits, targets, mask)
    return masked_cross_entropy(logits, targets, mask, compile).sum()


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) fp32 log-probability of each target, under the same temperature as the sampler."""
    return sampling_logprobs(logits, temperature).gather(-1, targets[..., None]).squeeze(-1)


def distribution_entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """(...,) entropy in nats of each distribution given as log-probabilities (..., V)."""
    return -(logprobs.exp() * logprobs).sum(-1)


# ---------------------------------------------------------------------------------------------
# Chunked cross-entropy: one (C, V) slice of rows at a time, in the forward and in the backward
#
# F.cross_entropy over (N, V) logits stores an (N, V) log-softmax for the backward pass, and its
# backward allocates (N, V) intermediates besides the (N, V) gradient. The function below keeps
# only one logsumexp per row between the passes. The backward recomputes the softmax a chunk at a
# time and writes it straight into the gradient, so the extra memory is the gradient itself plus
# one chunk.

CROSS_ENTROPY_CHUNK_ELEMENTS = 2 ** 20  # logits per chunk, 4 MiB in fp32


def _cross_entropy_rows(logit_rows, rows, targets):
    """Cross-entropy (C,) and logsumexp (C,) in fp32 of the rows `rows` (C,) of logit_rows (R, V)."""
    x = logit_rows.index_select(0, rows).float()  # (C, V)
    logprobs = torch.log_softmax(x, dim=-1)
    target_logprobs = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    return -target_logprobs, x.gather(-1, targets[:, None]).squeeze(-1) - target_logprobs


def _cross_entropy_rows_grad(logit_rows, rows, log_normalizer, targets, grad_losses):
    """Gradient (C, V) fp32 of sum_i grad_losses[i] * loss[i]: (softmax - one_hot(target)) * grad."""
    x = logit_rows.index_select(0, rows).float()  # (C, V), a fresh tensor, so in-place is safe
    grad = x.sub_(log_normalizer[:, None]).exp_().mul_(grad_losses[:, None])
    return grad.scatter_add_(-1, targets[:, None], -grad_losses[:, None])


_cross_entropy_kernels = {
    False: (_cross_entropy_rows, _cross_entropy_rows_grad),
    True: (MaybeCompiled(_cross_entropy_rows), MaybeCompiled(_cross_entropy_rows_grad)),
}


def _as_rows(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """View logits (B, T, V) as rows (R, V) of their storage without a copy, and return the row
    step between batch entries: position (b, t) is row b * step + t. A slice such as
    logits[:, :-1] of a contiguous tensor qualifies; other layouts are copied."""
    B, T, V = logits.shape
    if logits.stride(2) != 1 or logits.stride(1) != V or logits.stride(0) % V:
        logits = logits.contiguous()
    step = logits.stride(0) // V
    return logits.as_strided(((B - 1) * step + T, V), (V, 1)), step


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Per-position cross-entropy (M,) at the positions (batch_index, time_index) of logits (B, T, V)."""

    @staticmethod
    def forward(ctx, logits, batch_index, time_index, targets, chunk_rows: int, compile: bool):
        rows_loss, rows_grad = _cross_entropy_kernels[compile]
        logit_rows, step = _as_rows(logits)
        rows = batch_index * step + time_index  # (M,) row of each position in logit_rows
        M = len(targets)
        losses = torch.empty(M, device=logits.device)  # (M,) fp32
        log_normalizers = torch.empty(M, device=logits.device)  # (M,) fp32, all the backward keeps
        for start in range(0, M, chunk_rows):
            end = min(start + chunk_rows, M)
            losses[start:end], log_normalizers[start:end] = rows_loss(logit_rows, rows[start:end], targets[start:end])
        ctx.save_for_backward(logits, batch_index, time_index, targets, log_normalizers)
        ctx.chunk_rows, ctx.rows_grad = chunk_rows, rows_grad
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        logits, batch_index, time_index, targets, log_normalizers = ctx.saved_tensors
        logit_rows, step = _as_rows(logits)
        rows = batch_index * step + time_index
        B, T, V = logits.shape
        grad = torch.zeros(B, T, V, dtype=logits.dtype, device=logits.device)
        grad_rows = grad.view(B * T, V)
        grad_losses = grad_losses.float()
        for start in range(0, len(targets), ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, len(targets))
            chunk = ctx.rows_grad(logit_rows, rows[start:end], log_normalizers[start:end], targets[start:end],
                                  grad_losses[start:end])
            grad_rows.index_copy_(0, batch_index[start:end] * T + time_index[start:end], chunk.to(grad.dtype))
        return grad, None, None, None, None, None


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, compile: bool = True,
                         chunk_elements: int = CROSS_ENTROPY_CHUNK_ELEMENTS) -> torch.Tensor:
    """Cross-entropy (M,) in fp32 of each masked target, in the row-major order of mask.nonzero().

    logits (B, T, V) of any dtype (a slice such as logits[:, :-1] is read in place, not copied);
    targets and mask (B, T). Positions outside the mask are never read, so NaN there cannot reach
    the value or the gradient, and their gradient is exactly 0. Each chunk contains about
    `chunk_elements` logits; `compile` runs the per-chunk arithmetic through torch.compile.
    """
    batch_index, time_index = mask.nonzero(as_tuple=True)
    chunk_rows = max(1, chunk_elements // logits.shape[-1])
    return _ChunkedCrossEntropy.apply(logits, batch_index, time_index, targets[batch_index, time_index],
                                      chunk_rows, compile)


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


_score_regression_rows_compiled = MaybeCompiled(_score_regression_rows)


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
# GRPO: per-token terms, then one aggregation with a normaliser counted over the whole step
#
# A step's rollouts may be split into micro-batches (and, with several processes, across ranks).
# The normaliser is counted once over all of them before any backward pass. Each micro-batch
# divides its sum by that same number, so the accumulated gradient does not depend on the split
# or on how much padding a micro-batch has.

LOSS_AGGREGATIONS = {
    "token-mean": "sum over every valid token of the step / number of valid tokens of the step",
    "seq-mean-token-mean": "mean over each sequence's valid tokens, then mean over the step's sequences",
    "seq-mean-token-sum-norm": "sum over every valid token / (sequences of the step * max_new_tokens), "
                               "the constant normaliser of Dr. GRPO (Liu et al. 2025)",
}
KL_ESTIMATORS = ("k1", "k3")


def loss_normaliser(masks, mode: str, max_new_tokens: int) -> float:
    """Count the step's normaliser for `mode` over the masks (B_i, T_i) of all its micro-batches.

    A sequence counts only when it has at least one valid token, so rows dropped from the loss
    (truncated ones under truncation masking) leave numerator and denominator alike.
    """
    if mode == "token-mean":
        return float(sum(int(m.sum()) for m in masks))
    sequences = sum(int(m.any(-1).sum()) for m in masks)
    if mode == "seq-mean-token-mean":
        return float(sequences)
    if mode == "seq-mean-token-sum-norm":
        return float(sequences * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}")


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: str, normaliser: float) -> torch.Tensor:
    """Return one micro-batch's share of the step loss: values (B, T) at the valid positions of
    mask, reduced by `mode` and divided by the step's `normaliser` (from loss_normaliser).

    The masked-out slots are selected away, so NaN or inf there never reaches the result. A step with
    nothing to train on (normaliser 0) gives 0, not NaN.
    """
    summed = torch.where(mask, values, torch.zeros_like(values))
    if mode == "seq-mean-token-mean":
        summed = summed.sum(-1) / mask.sum(-1).clamp(min=1)
    elif mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {', '.join(LOSS_AGGREGATIONS)}")
    return summed.sum() / max(normaliser, 1.0)


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, clip_low: float, clip_high: float):
    """Per-token clipped surrogate of PPO (Schulman et al. 2017), (B, T), zero outside mask:

        -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A),  ratio = exp(logp - old_logp)

    A separate upper bound (clip_high > clip_low) is the "clip-higher" of DAPO (Yu et al. 2025).
    Returns (loss, ratio, clipped_low, clipped_high), the last two bool: where the clip is active
    and takes the gradient away (ratio below 1 - clip_low with A < 0, above 1 + clip_high with A > 0).
    """
    # select masked slots away before any arithmetic: they may hold NaN from padding
    old_logprobs = torch.where(mask, old_logprobs, logprobs.detach())
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    with torch.no_grad():
        clipped_low = mask & (ratio < 1 - clip_low) & (advantages < 0)
        clipped_high = mask & (ratio > 1 + clip_high) & (advantages > 0)
    return torch.where(mask, loss, torch.zeros_like(loss)), ratio.detach(), clipped_low, clipped_high


def kl_penalty(logprobs, ref_logprobs, mask, estimator: str = "k3"):
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy, (B, T), zero
    outside mask (Schulman 2020, "Approximating KL divergence"), with d = ref_logp - logp:

        k1 = -d                 unbiased, can be negative per token
        k3 = exp(d) - d - 1     unbiased and >= 0 per token
    """
    ref_logprobs = torch.where(mask, ref_logprobs, logprobs.detach())
    d = ref_logprobs - logprobs
    if estimator == "k1":
        kl = -d
    elif estimator == "k3":
        kl = torch.exp(d) - d - 1
    else:
        raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    return torch.where(mask, kl, torch.zeros_like(kl))

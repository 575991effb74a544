import math

import pytest
import torch
import torch.nn.functional as F

from pcl import losses
from pcl.losses import (grpo_token_loss, score_regression_fused, score_regression_reference, token_cross_entropy,
                        token_logprobs)

CANDIDATE_IDS = torch.tensor([3, 4, 5])  # ids of the score tokens "0", "1", "2"
CANDIDATE_VALUES = torch.tensor([0.0, 1.0, 2.0])


def random_logits(B, T, V, seed=0):
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed)) * 2


# ---------------------------------------------------------------------------------------------
# token_cross_entropy


def test_cross_entropy_by_hand():
    logits = random_logits(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True, False, True, True, False], [False, False, True, False, True]])
    expected = sum(F.cross_entropy(logits[b, t], targets[b, t]) for b in range(2) for t in range(5) if mask[b, t])
    torch.testing.assert_close(token_cross_entropy(logits, targets, mask), expected)


def test_cross_entropy_ignores_nan_outside_mask():
    logits = random_logits(2, 4, 7)
    targets = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    poisoned = logits.clone()
    poisoned[~mask] = float("nan")
    torch.testing.assert_close(token_cross_entropy(poisoned, targets, mask), token_cross_entropy(logits, targets, mask))


def test_cross_entropy_nan_outside_mask_gradient():
    logits = random_logits(1, 4, 7)
    logits[0, 3] = float("nan")
    logits.requires_grad_(True)
    mask = torch.tensor([[True, True, False, False]])
    token_cross_entropy(logits, torch.zeros(1, 4, dtype=torch.long), mask).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[0, 2:], torch.zeros(2, 7))


def test_cross_entropy_bf16_computed_in_fp32():
    logits = random_logits(1, 3, 7)
    targets = torch.tensor([[1, 2, 3]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss = token_cross_entropy(logits.bfloat16(), targets, mask)
    assert loss.dtype == torch.float32


def test_cross_entropy_sum_not_mean():
    logits = torch.zeros(1, 4, 8)  # uniform: each target costs log 8
    mask = torch.tensor([[True, True, True, False]])
    loss = token_cross_entropy(logits, torch.zeros(1, 4, dtype=torch.long), mask)
    assert loss.item() == pytest.approx(3 * math.log(8))


def test_token_logprobs_temperature():
    logits = random_logits(2, 3, 9)
    targets = torch.tensor([[0, 4, 8], [1, 1, 2]])
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, targets, temperature=0.7), expected)


# ---------------------------------------------------------------------------------------------
# Score regression


def score_case(seed=0):
    """Logits (3, 6, 16) with a score position in rows 0 and 2 only, and true rewards (3,)."""
    logits = random_logits(3, 6, 16, seed=seed)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[0, 2] = True
    mask[2, 5] = True
    targets = torch.tensor([2.0, 1.0, 0.0])
    return logits, mask, targets


def value_and_grad(fn, logits, mask, targets, **kwargs):
    logits = logits.clone().requires_grad_(True)
    value = fn(logits, mask, CANDIDATE_IDS, CANDIDATE_VALUES, targets, **kwargs)
    value.backward()
    return value.detach(), logits.grad


def test_score_fused_eager_matches_reference():
    logits, mask, targets = score_case()
    value, grad = value_and_grad(score_regression_fused, logits, mask, targets, compile=False)
    expected_value, expected_grad = value_and_grad(score_regression_reference, logits, mask, targets)
    torch.testing.assert_close(value, expected_value, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)


def test_score_fused_compiled_matches_reference():
    # the only compiled test: the first torch.compile call takes several seconds on CPU
    logits, mask, targets = score_case()
    value, grad = value_and_grad(score_regression_fused, logits, mask, targets, compile=True)
    # the wrapper falls back to eager when compilation fails, which would make this test vacuous
    assert losses._score_regression_rows_compiled.enabled
    expected_value, expected_grad = value_and_grad(score_regression_reference, logits, mask, targets)
    torch.testing.assert_close(value, expected_value, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)

    # a second call with three score positions instead of two
    mask[1, 0] = True
    value, grad = value_and_grad(score_regression_fused, logits, mask, targets, compile=True)
    expected_value, expected_grad = value_and_grad(score_regression_reference, logits, mask, targets)
    torch.testing.assert_close(value, expected_value, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)


def test_score_rows_without_score_ignored():
    logits, mask, targets = score_case()
    _, grad = value_and_grad(score_regression_fused, logits, mask, targets, compile=False)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_score_row_target_irrelevant_without_score():
    logits, mask, targets = score_case()
    changed = targets.clone()
    changed[1] = 100.0
    first = score_regression_fused(logits, mask, CANDIDATE_IDS, CANDIDATE_VALUES, targets, compile=False)
    second = score_regression_fused(logits, mask, CANDIDATE_IDS, CANDIDATE_VALUES, changed, compile=False)
    assert first.item() == second.item()


def test_score_nan_outside_mask():
    logits, mask, targets = score_case()
    poisoned = logits.clone()
    poisoned[~mask] = float("nan")
    value, grad = value_and_grad(score_regression_fused, poisoned, mask, targets, compile=False)
    expected = score_regression_fused(logits, mask, CANDIDATE_IDS, CANDIDATE_VALUES, targets, compile=False)
    torch.testing.assert_close(value, expected.detach())
    assert torch.isfinite(grad).all()


def test_score_empty_mask_zero():
    logits, mask, targets = score_case()
    value, grad = value_and_grad(score_regression_fused, logits, torch.zeros_like(mask), targets, compile=False)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_score_empty_mask_nonfinite_logits():
    logits, mask, targets = score_case()
    logits[1, 3, 7] = float("-inf")
    value = score_regression_fused(logits, torch.zeros_like(mask), CANDIDATE_IDS, CANDIDATE_VALUES, targets,
                                   compile=False)
    assert value.item() == 0.0


def test_score_hand_computed():
    # probabilities over 6 ids, of which ids 3, 4, 5 are the scores 0, 1, 2
    probs = torch.tensor([0.05, 0.1, 0.05, 0.2, 0.3, 0.3])
    logits = probs.log().expand(2, 1, 6).clone()
    mask = torch.ones(2, 1, dtype=torch.bool)
    targets = torch.tensor([2.0, 0.0])
    # E[score] = 0.2 * 0 + 0.3 * 1 + 0.3 * 2 = 0.9, so the errors are (0.9 - 2)^2 = 1.21 and 0.9^2 = 0.81
    expected = 1.21 + 0.81
    for fn in (score_regression_reference, score_regression_fused):
        kwargs = {"compile": False} if fn is score_regression_fused else {}
        value = fn(logits, mask, CANDIDATE_IDS, CANDIDATE_VALUES, targets, **kwargs)
        assert value.item() == pytest.approx(expected, abs=1e-6), fn.__name__


def test_score_hand_gradient():
    # d/dz_j (E - r)^2 = 2 (E - r) p_j (v_j - E), with v_j = 0 for ids that are not scores
    probs = torch.tensor([0.05, 0.1, 0.05, 0.2, 0.3, 0.3])
    values = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0])
    expected_score, target = 0.9, 2.0
    expected = 2 * (expected_score - target) * probs * (values - expected_score)
    logits = probs.log().view(1, 1, 6)
    _, grad = value_and_grad(score_regression_fused, logits, torch.ones(1, 1, dtype=torch.bool),
                             torch.tensor([target]), compile=False)
    torch.testing.assert_close(grad.view(6), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# GRPO


def grpo(logprobs, old, advantages, mask=None, ref=None, clip_eps=0.2, kl_coef=0.0):
    logprobs = logprobs.clone().requires_grad_(True)
    if mask is None:
        mask = torch.ones_like(logprobs, dtype=torch.bool)
    loss, stats = grpo_token_loss(logprobs, old, ref, advantages, mask, clip_eps, kl_coef)
    loss.sum().backward()
    return loss.detach(), logprobs.grad, stats


def test_grpo_on_policy():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    advantages = torch.tensor([[0.5, -1.5, 2.0]])
    loss, grad, stats = grpo(logprobs, logprobs.clone(), advantages)
    torch.testing.assert_close(loss, -advantages)
    torch.testing.assert_close(grad, -advantages)
    assert stats["ratio"].item() == pytest.approx(3.0)
    assert stats["clipped"].item() == 0.0


def test_grpo_advantage_broadcast():
    # one advantage per sequence (B, 1) applies to each of its tokens
    logprobs = torch.full((2, 3), -1.0)
    advantages = torch.tensor([[1.0], [-2.0]])
    loss, _, _ = grpo(logprobs, logprobs.clone(), advantages)
    assert loss.tolist() == [[-1.0, -1.0, -1.0], [2.0, 2.0, 2.0]]


def test_grpo_clip_positive_advantage():
    logprobs = torch.tensor([[-1.0]])
    old = logprobs - math.log(1.5)  # ratio 1.5
    loss, grad, stats = grpo(logprobs, old, torch.tensor([[2.0]]), clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2 * 2.0)
    assert grad.item() == 0.0
    assert stats["clipped"].item() == 1.0


def test_grpo_clip_negative_advantage_not_clipped():
    # the pessimistic bound keeps the unclipped 1.5 * A, so the gradient flows: -A * ratio
    logprobs = torch.tensor([[-1.0]])
    old = logprobs - math.log(1.5)
    loss, grad, _ = grpo(logprobs, old, torch.tensor([[-1.0]]), clip_eps=0.2)
    assert loss.item() == pytest.approx(1.5)
    assert grad.item() == pytest.approx(1.5)


def test_grpo_clip_low_ratio_negative_advantage():
    logprobs = torch.tensor([[-1.0]])
    old = logprobs - math.log(0.5)  # ratio 0.5, below 1 - eps
    loss, grad, _ = grpo(logprobs, old, torch.tensor([[-1.0]]), clip_eps=0.2)
    assert loss.item() == pytest.approx(0.8)
    assert grad.item() == 0.0


def test_grpo_kl_k3_value():
    logprobs = torch.tensor([[-1.0]])
    ref = torch.tensor([[-0.5]])  # log(ref / policy) = 0.5
    kl = math.exp(0.5) - 0.5 - 1  # 0.148721...
    loss, grad, stats = grpo(logprobs, logprobs.clone(), torch.tensor([[1.0]]), ref=ref, kl_coef=0.1)
    assert stats["kl"].item() == pytest.approx(kl, abs=1e-6)
    assert loss.item() == pytest.approx(-1.0 + 0.1 * kl, abs=1e-6)
    # d kl / d logprobs = 1 - exp(ref - logprobs)
    assert grad.item() == pytest.approx(-1.0 + 0.1 * (1 - math.exp(0.5)), abs=1e-6)


def test_grpo_kl_nonnegative():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 50, generator=generator) * 5
    ref = -torch.rand(4, 50, generator=generator) * 5
    zeros = torch.zeros(4, 50)
    loss, _, stats = grpo(logprobs, logprobs.clone(), zeros, ref=ref, kl_coef=1.0)
    assert (loss >= 0).all()
    assert stats["kl"].item() > 0


def test_grpo_kl_zero_at_reference():
    logprobs = torch.tensor([[-1.0, -3.0]])
    _, _, stats = grpo(logprobs, logprobs.clone(), torch.zeros(1, 2), ref=logprobs.clone(), kl_coef=1.0)
    assert stats["kl"].item() == 0.0


def test_grpo_kl_off_ignores_ref():
    logprobs = torch.tensor([[-1.0]])
    ref = torch.tensor([[float("nan")]])
    loss, _, stats = grpo(logprobs, logprobs.clone(), torch.tensor([[1.0]]), ref=ref, kl_coef=0.0)
    assert loss.item() == -1.0
    assert stats["kl"].item() == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_grpo_masked_nonfinite(bad):
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    old = torch.tensor([[-1.0, bad, bad]])
    ref = torch.tensor([[-1.5, bad, bad]])
    mask = torch.tensor([[True, False, False]])
    advantages = torch.tensor([[1.0, 1.0, 1.0]])
    loss, grad, stats = grpo(logprobs, old, advantages, mask=mask, ref=ref, kl_coef=0.1)
    assert loss[0, 1:].tolist() == [0.0, 0.0]
    assert grad[0, 1:].tolist() == [0.0, 0.0]
    assert torch.isfinite(loss).all()
    assert torch.isfinite(grad).all()
    for name, value in stats.items():
        assert torch.isfinite(value), name


def test_grpo_masked_advantage_ignored():
    logprobs = torch.tensor([[-1.0, -2.0]])
    mask = torch.tensor([[True, False]])
    loss, grad, stats = grpo(logprobs, logprobs.clone(), torch.tensor([[1.0, 5.0]]), mask=mask)
    assert loss.tolist() == [[-1.0, 0.0]]
    assert grad.tolist() == [[-1.0, 0.0]]
    assert stats["ratio"].item() == 1.0

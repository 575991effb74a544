import math

import pytest
import torch
import torch.nn.functional as F

from model.compiled import MaybeCompiled
from pcl import losses
from pcl.losses import (LOSS_AGGREGATIONS, aggregate, clipped_policy_loss, kl_penalty, loss_normaliser,
                        masked_cross_entropy, score_regression_fused, score_regression_reference, token_cross_entropy,
                        token_cross_entropy_reference, token_logprobs)

CANDIDATE_IDS = torch.tensor([3, 4, 5])  # ids of the score tokens "0", "1", "2"
CANDIDATE_VALUES = torch.tensor([0.0, 1.0, 2.0])


def random_logits(B, T, V, seed=0):
    return torch.randn(B, T, V, generator=torch.Generator().manual_seed(seed)) * 2


# ---------------------------------------------------------------------------------------------
# token_cross_entropy


COMPILE_MODES = [pytest.param(False, id="eager"), pytest.param(True, id="compiled")]


@pytest.fixture(autouse=True)
def chunk_all_logits(monkeypatch):
    # token_cross_entropy chunks only large logits; the small ones of these tests must take that path too
    monkeypatch.setattr(losses, "CHUNKED_CROSS_ENTROPY_MIN_LOGITS", 0)


def test_small_logits_take_the_reference(monkeypatch):
    monkeypatch.setattr(losses, "CHUNKED_CROSS_ENTROPY_MIN_LOGITS", 3 * 7 * 13 + 1)
    monkeypatch.setattr(losses, "masked_cross_entropy", None)  # calling it would raise
    logits = random_logits(3, 7, 13, seed=2)
    targets = torch.randint(0, 13, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(4)) < 0.6
    value, grad = cross_entropy_value_and_grad(token_cross_entropy, logits, targets, mask)
    expected_value, expected_grad = cross_entropy_value_and_grad(token_cross_entropy_reference, logits, targets, mask)
    assert torch.equal(value, expected_value)
    assert torch.equal(grad, expected_grad)


@pytest.mark.parametrize("compile", COMPILE_MODES)
def test_cross_entropy_by_hand(compile):
    logits = random_logits(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True, False, True, True, False], [False, False, True, False, True]])
    expected = sum(F.cross_entropy(logits[b, t], targets[b, t]) for b in range(2) for t in range(5) if mask[b, t])
    torch.testing.assert_close(token_cross_entropy(logits, targets, mask, compile=compile), expected)
    torch.testing.assert_close(token_cross_entropy_reference(logits, targets, mask), expected)


def cross_entropy_value_and_grad(fn, logits, targets, mask, **kwargs):
    leaf = logits.detach().clone().requires_grad_(True)
    value = fn(leaf, targets, mask, **kwargs)
    value.backward()
    return value.detach(), leaf.grad


@pytest.mark.parametrize("compile", COMPILE_MODES)
@pytest.mark.parametrize("chunk_elements", [1, 40, 2 ** 20])  # one row per chunk, a ragged last chunk, one chunk
def test_cross_entropy_chunked_matches_reference(compile, chunk_elements):
    logits = random_logits(3, 7, 13, seed=2)
    targets = torch.randint(0, 13, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(4)) < 0.6

    def chunked(x, t, m):
        return masked_cross_entropy(x, t, m, compile=compile, chunk_elements=chunk_elements).sum()

    value, grad = cross_entropy_value_and_grad(chunked, logits, targets, mask)
    expected_value, expected_grad = cross_entropy_value_and_grad(token_cross_entropy_reference, logits, targets, mask)
    torch.testing.assert_close(value, expected_value, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)
    if compile:  # the wrappers fall back to eager when compilation fails, which would make this test vacuous
        assert all(kernel.enabled for kernel in losses._cross_entropy_kernels[True])


@pytest.mark.parametrize("compile", COMPILE_MODES)
def test_cross_entropy_sliced_logits(compile):
    # logits[:, :-1] of the model output is read in place; its gradient reaches the full tensor
    full = random_logits(2, 6, 9, seed=5)
    targets = torch.randint(0, 9, (2, 5), generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[False, True, True, True, False], [True, True, False, True, True]])
    grads = []
    for fn, kwargs in ((token_cross_entropy, {"compile": compile}), (token_cross_entropy_reference, {})):
        leaf = full.clone().requires_grad_(True)
        value = fn(leaf[:, :-1], targets, mask, **kwargs)
        value.backward()
        grads.append((value.detach(), leaf.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=0)


def test_cross_entropy_per_position_order():
    logits = random_logits(2, 4, 5, seed=7)
    targets = torch.randint(0, 5, (2, 4), generator=torch.Generator().manual_seed(8))
    mask = torch.tensor([[True, False, True, False], [False, True, True, True]])
    expected = F.cross_entropy(logits[mask], targets[mask], reduction="none")  # row-major order of the mask
    torch.testing.assert_close(masked_cross_entropy(logits, targets, mask, compile=False), expected)


@pytest.mark.parametrize("compile", COMPILE_MODES)
def test_cross_entropy_ignores_nan_outside_mask(compile):
    logits = random_logits(2, 4, 7)
    targets = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    poisoned = logits.clone()
    poisoned[~mask] = float("nan")
    torch.testing.assert_close(token_cross_entropy(poisoned, targets, mask, compile=compile),
                               token_cross_entropy(logits, targets, mask, compile=compile))


@pytest.mark.parametrize("compile", COMPILE_MODES)
def test_cross_entropy_nan_outside_mask_gradient(compile):
    logits = random_logits(1, 4, 7)
    logits[0, 3] = float("nan")
    logits.requires_grad_(True)
    mask = torch.tensor([[True, True, False, False]])
    token_cross_entropy(logits, torch.zeros(1, 4, dtype=torch.long), mask, compile=compile).backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[0, 2:], torch.zeros(2, 7))


@pytest.mark.parametrize("compile", COMPILE_MODES)
def test_cross_entropy_bf16_computed_in_fp32(compile):
    logits = random_logits(1, 3, 7)
    targets = torch.tensor([[1, 2, 3]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    leaf = logits.bfloat16().requires_grad_(True)
    loss = token_cross_entropy(leaf, targets, mask, compile=compile)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, token_cross_entropy_reference(logits.bfloat16(), targets, mask))
    loss.backward()
    assert leaf.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("compile", COMPILE_MODES)
def test_cross_entropy_empty_mask_zero(compile):
    logits = random_logits(1, 3, 7).requires_grad_(True)
    loss = token_cross_entropy(logits, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool),
                               compile=compile)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_cross_entropy_sum_not_mean():
    logits = torch.zeros(1, 4, 8)  # uniform: each target costs log 8
    mask = torch.tensor([[True, True, True, False]])
    loss = token_cross_entropy(logits, torch.zeros(1, 4, dtype=torch.long), mask, compile=False)
    assert loss.item() == pytest.approx(3 * math.log(8))


def test_compile_failure_falls_back_to_eager(caplog):
    def double(x):
        return 2 * x

    def broken(*args):
        raise RuntimeError("no compiler")

    wrapper = MaybeCompiled(double)
    wrapper.compiled = broken
    with caplog.at_level("WARNING"):
        assert wrapper(torch.tensor(3.0)).item() == 6.0
    assert not wrapper.enabled
    assert "using eager" in caplog.text
    assert wrapper(torch.tensor(4.0)).item() == 8.0  # later calls go straight to eager


def test_input_error_keeps_compilation(caplog):
    # an error that eager raises too is the input's, not the compiler's: it propagates, unlogged
    def checked(x):
        if x.item() < 0:
            raise ValueError("negative input")
        return 2 * x

    wrapper = MaybeCompiled(checked)
    wrapper.compiled = checked
    with caplog.at_level("WARNING"), pytest.raises(ValueError, match="negative input"):
        wrapper(torch.tensor(-1.0))
    assert wrapper.enabled
    assert "using eager" not in caplog.text


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
# GRPO: clipped policy loss and KL penalty


def policy(logprobs, old, advantages, mask=None, clip_low=0.2, clip_high=0.2):
    logprobs = logprobs.clone().requires_grad_(True)
    if mask is None:
        mask = torch.ones_like(logprobs, dtype=torch.bool)
    loss, ratio, low, high = clipped_policy_loss(logprobs, old, advantages, mask, clip_low, clip_high)
    loss.sum().backward()
    return loss.detach(), logprobs.grad, ratio, low, high


def test_policy_on_policy():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    advantages = torch.tensor([[0.5, -1.5, 2.0]])
    loss, grad, ratio, low, high = policy(logprobs, logprobs.clone(), advantages)
    torch.testing.assert_close(loss, -advantages)
    torch.testing.assert_close(grad, -advantages)
    assert torch.equal(ratio, torch.ones(1, 3))
    assert not low.any()
    assert not high.any()


def test_policy_advantage_broadcast():
    # one advantage per sequence (B, 1) applies to each of its tokens
    logprobs = torch.full((2, 3), -1.0)
    loss, _, _, _, _ = policy(logprobs, logprobs.clone(), torch.tensor([[1.0], [-2.0]]))
    assert loss.tolist() == [[-1.0, -1.0, -1.0], [2.0, 2.0, 2.0]]


def test_policy_clip_high_positive_advantage():
    logprobs = torch.tensor([[-1.0]])
    old = logprobs - math.log(1.5)  # ratio 1.5 > 1 + 0.2
    loss, grad, _, low, high = policy(logprobs, old, torch.tensor([[2.0]]))
    assert loss.item() == pytest.approx(-1.2 * 2.0)
    assert grad.item() == 0.0
    assert high.item()
    assert not low.item()


def test_policy_clip_high_separate_bound():
    # DAPO's clip-higher: with clip_high 0.6 a ratio of 1.5 is inside the range
    logprobs = torch.tensor([[-1.0]])
    old = logprobs - math.log(1.5)
    loss, grad, _, _, high = policy(logprobs, old, torch.tensor([[2.0]]), clip_low=0.2, clip_high=0.6)
    assert loss.item() == pytest.approx(-1.5 * 2.0)
    assert grad.item() == pytest.approx(-1.5 * 2.0)
    assert not high.item()


def test_policy_negative_advantage_above_range_not_clipped():
    # the pessimistic bound keeps the unclipped 1.5 * A, so the gradient flows: -A * ratio
    logprobs = torch.tensor([[-1.0]])
    old = logprobs - math.log(1.5)
    loss, grad, _, low, high = policy(logprobs, old, torch.tensor([[-1.0]]))
    assert loss.item() == pytest.approx(1.5)
    assert grad.item() == pytest.approx(1.5)
    assert not low.item()
    assert not high.item()


def test_policy_clip_low_negative_advantage():
    logprobs = torch.tensor([[-1.0]])
    old = logprobs - math.log(0.5)  # ratio 0.5 < 1 - 0.2
    loss, grad, _, low, high = policy(logprobs, old, torch.tensor([[-1.0]]), clip_low=0.2, clip_high=0.6)
    assert loss.item() == pytest.approx(0.8)
    assert grad.item() == 0.0
    assert low.item()
    assert not high.item()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_policy_masked_nonfinite(bad):
    logprobs = torch.tensor([[-1.0, -2.0, -3.0]])
    old = torch.tensor([[-1.0, bad, bad]])
    advantages = torch.tensor([[1.0, bad, 1.0]])
    mask = torch.tensor([[True, False, False]])
    loss, grad, _, low, high = policy(logprobs, old, advantages, mask=mask)
    assert loss.tolist() == [[-1.0, 0.0, 0.0]]
    assert grad.tolist() == [[-1.0, 0.0, 0.0]]
    assert not low.any()
    assert not high.any()


def kl(logprobs, ref, estimator, mask=None):
    logprobs = logprobs.clone().requires_grad_(True)
    mask = torch.ones_like(logprobs, dtype=torch.bool) if mask is None else mask
    value = kl_penalty(logprobs, ref, mask, estimator)
    value.sum().backward()
    return value.detach(), logprobs.grad


def test_kl_k3_value_and_gradient():
    logprobs, ref = torch.tensor([[-1.0]]), torch.tensor([[-0.5]])  # d = ref - logp = 0.5
    value, grad = kl(logprobs, ref, "k3")
    assert value.item() == pytest.approx(math.exp(0.5) - 0.5 - 1, abs=1e-6)  # 0.148721
    assert grad.item() == pytest.approx(1 - math.exp(0.5), abs=1e-6)  # d k3 / d logp = 1 - exp(d)


def test_kl_k1_value_and_gradient():
    value, grad = kl(torch.tensor([[-1.0]]), torch.tensor([[-0.5]]), "k1")
    assert value.item() == pytest.approx(-0.5)  # logp - ref: negative where the reference is likelier
    assert grad.item() == 1.0


def test_kl_k3_nonnegative_and_zero_at_reference():
    generator = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(4, 50, generator=generator) * 5
    ref = -torch.rand(4, 50, generator=generator) * 5
    assert (kl(logprobs, ref, "k3")[0] >= 0).all()
    assert kl(logprobs, logprobs.clone(), "k3")[0].abs().max() == 0


def test_kl_estimators_are_unbiased():
    # E_{x ~ p}[k] = KL(p || q) for both estimators, checked exactly on a 3-token distribution
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    exact = (p * (p / q).log()).sum()
    for estimator in ("k1", "k3"):
        values = kl_penalty(p.log()[None], q.log()[None], torch.ones(1, 3, dtype=torch.bool), estimator)
        torch.testing.assert_close((p * values[0]).sum(), exact)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_kl_masked_nonfinite(bad):
    value, grad = kl(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, bad]]), "k3",
                     mask=torch.tensor([[True, False]]))
    assert value[0, 1].item() == 0.0
    assert grad[0, 1].item() == 0.0
    assert torch.isfinite(value).all()
    assert torch.isfinite(grad).all()


def test_kl_unknown_estimator():
    with pytest.raises(ValueError, match="k2"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "k2")


# ---------------------------------------------------------------------------------------------
# GRPO: aggregation with a step normaliser

# two sequences with 3 and 1 valid tokens; per-token values 1, 2, 3 and 10
VALUES = torch.tensor([[1.0, 2.0, 3.0, 0.0], [10.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[True, True, True, False], [True, False, False, False]])


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (1 + 2 + 3 + 10) / 4),  # 4.0
    ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 10 / 1) / 2),  # 6.0
    ("seq-mean-token-sum-norm", (1 + 2 + 3 + 10) / (2 * 8)),  # 1.0 with max_new_tokens 8
])
def test_aggregate_by_hand(mode, expected):
    normaliser = loss_normaliser([MASK], mode, max_new_tokens=8)
    assert aggregate(VALUES, MASK, mode, normaliser).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", list(LOSS_AGGREGATIONS))
def test_aggregate_split_and_padding_invariant(mode):
    """The step loss summed over micro-batches equals the loss of the whole batch, whatever the
    split and however much padding each micro-batch carries."""
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 7, 2, 4]
    values = torch.randn(len(lengths), 7, generator=generator)
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    whole = aggregate(values, mask, mode, loss_normaliser([mask], mode, 7))
    for split in ([3, 3], [1, 2, 3], [1] * 6):
        parts = torch.split(torch.arange(len(lengths)), split)
        # each micro-batch is cut to its own longest row, then padded with 5 junk columns
        chunks = []
        for index in parts:
            width = max(lengths[i] for i in index)
            v = torch.cat([values[index, :width], torch.full((len(index), 5), float("nan"))], 1)
            m = torch.cat([mask[index, :width], torch.zeros(len(index), 5, dtype=torch.bool)], 1)
            chunks.append((v, m))
        normaliser = loss_normaliser([m for _, m in chunks], mode, 7)
        total = sum(aggregate(v, m, mode, normaliser) for v, m in chunks)
        torch.testing.assert_close(total, whole)


def test_token_mean_differs_from_per_batch_means():
    # the bug this normaliser prevents: averaging each micro-batch by its own token count
    per_batch = (aggregate(VALUES[:1], MASK[:1], "token-mean", 3) + aggregate(VALUES[1:], MASK[1:], "token-mean", 1)) / 2
    assert per_batch.item() == pytest.approx(6.0)
    assert aggregate(VALUES, MASK, "token-mean", loss_normaliser([MASK], "token-mean", 8)).item() == 4.0


@pytest.mark.parametrize("mode", list(LOSS_AGGREGATIONS))
def test_aggregate_nothing_valid_is_zero(mode):
    values = torch.full((2, 3), float("nan"), requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss = aggregate(values, mask, mode, loss_normaliser([mask], mode, 3))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(values.grad, torch.zeros(2, 3))


def test_normaliser_counts_only_rows_with_tokens():
    mask = torch.tensor([[True, False], [False, False]])  # the second row was dropped (truncated)
    assert loss_normaliser([mask], "seq-mean-token-mean", 2) == 1
    assert loss_normaliser([mask], "seq-mean-token-sum-norm", 2) == 2
    with pytest.raises(ValueError, match="token-sum"):
        loss_normaliser([mask], "token-sum", 2)

import copy
import dataclasses
import math

import pytest
import torch

from data import Row, format_prompt
from eval.evaluate import evaluate
from model.config import ModelConfig
from model.transformer import Transformer
from pcl import rewards
from pcl.grpo import (GRPOConfig, Rollouts, collect_rollouts, compute_rewards, flat_groups, group_advantages,
                      grpo_backward, micro_batches, rollout_stats, white_box_reward_fns)
from pcl.losses import token_logprobs
from pcl.sequence import (COMPLETION, Segment, collate, evaluation_track, prompt_ids, rollout_sequence,
                          target_mask)
from pcl.sft import gold_completion
from test_evaluate import memorize

ROW = Row(question="Ann has 12 apples. She buys 7 more. How many apples does Ann have now?",
          answer="19", reasoning="12 + 7 = 19.", source="test:0")
WEIGHTS = rewards.RewardWeights()


@pytest.fixture(scope="module")
def memorized(tok):
    """A tiny model trained to write one full post-completion sequence for ROW."""
    prompt = prompt_ids(tok, format_prompt("synthetic", ROW))
    evaluation, reward = rewards.render_evaluation(1, 1, WEIGHTS)
    sequence = evaluation_track(tok, prompt, tok.encode(gold_completion(ROW)), evaluation, reward)
    model = memorize(tok, sequence)
    return model, prompt, sequence


def test_inference_stops_at_marker(tok, memorized):
    model, _, _ = memorized
    _, records = evaluate(model, tok, "synthetic", [ROW], WEIGHTS, max_new_tokens=64)
    completion = records[0]["completion"]
    assert completion.endswith(rewards.MARKER)
    assert completion.count(rewards.MARKER) == 1
    assert records[0]["tokens"] == len(tok.encode(completion))


def test_evaluation_continues_past_marker(tok, memorized):
    model, _, _ = memorized
    metrics, records = evaluate(model, tok, "synthetic", [ROW], WEIGHTS, max_new_tokens=64)
    assert records[0]["predicted_reward"] == 2.0
    assert metrics["reward_prediction_accuracy"] == 1.0
    assert metrics["accuracy"] == 1.0


@pytest.mark.parametrize("compile_decode", [False, True])
def test_rollouts_continue_to_eos(tok, memorized, compile_decode):
    model, prompt, sequence = memorized
    cfg = GRPOConfig(group_size=2, prompts_per_step=1, max_new_tokens=64, temperature=0.0,
                     compile_decode=compile_decode)
    rollouts = collect_rollouts(model, tok, "synthetic", [ROW], cfg, WEIGHTS)
    completion = rollouts.completions[0]
    assert completion == sequence.input_ids[len(prompt):]
    assert completion[-1] == tok.eos_id
    assert tok.marker_id in completion[:-1]
    assert rollouts.stopped == [True, True]
    assert rollouts.rewards["consistency"][0].item() == 1.0
    assert rollouts.total[0].item() == 3.0


def test_reward_functions_see_tags_without_eos(tok, memorized):
    model, _, _ = memorized
    seen = []

    def spy(texts, rows):
        seen.extend(texts)
        return [0.0] * len(texts)

    fns = {**white_box_reward_fns("synthetic", WEIGHTS), "spy": (spy, 1.0)}
    cfg = GRPOConfig(group_size=2, prompts_per_step=1, max_new_tokens=64, temperature=0.0)
    rollouts = collect_rollouts(model, tok, "synthetic", [ROW], cfg, WEIGHTS, reward_fns=fns)
    assert seen[0].startswith("<think>")
    assert "<post-completion>" in seen[0]
    assert seen[0].endswith("</reward>")
    assert tok.eos_token not in seen[0]
    assert rollouts.rewards["format"][0].item() == 1.0  # a correct completion gets format reward 1
    assert rollouts.rewards["accuracy"][0].item() == 1.0


def test_rollout_segments_match_builder(tok, memorized):
    model, prompt, sequence = memorized
    cfg = GRPOConfig(group_size=2, prompts_per_step=1, max_new_tokens=64, temperature=0.0)
    rollouts = collect_rollouts(model, tok, "synthetic", [ROW], cfg, WEIGHTS)
    assert rollouts.sequences[0].segment_ids == sequence.segment_ids


# ---------------------------------------------------------------------------------------------
# advantages


def test_advantages_all_equal_group_is_zero():
    advantages = group_advantages(torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 1.0]]), scale=True)
    assert torch.equal(advantages[0], torch.zeros(3))
    assert torch.allclose(advantages[1], torch.tensor([-1.2247, 1.2247, 0.0]), atol=1e-3)


def test_advantages_unscaled_are_centered():
    advantages = group_advantages(torch.tensor([[0.0, 3.0]]), scale=False)
    assert torch.equal(advantages, torch.tensor([[-1.5, 1.5]]))


def test_advantages_group_of_one_is_zero():
    advantages = group_advantages(torch.tensor([[2.0], [0.0]]), scale=True)
    assert torch.equal(advantages, torch.zeros(2, 1))


def test_advantages_missing_reward_left_out():
    nan = float("nan")
    # valid rewards 0 and 2 in the first group: mean 1, std 1; the missing one gets 0
    advantages = group_advantages(torch.tensor([[0.0, nan, 2.0], [nan, 1.0, nan], [nan, nan, nan]]), scale=True)
    torch.testing.assert_close(advantages[0], torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001]))
    assert torch.equal(advantages[1:], torch.zeros(2, 3))  # one or no valid reward: no signal
    assert flat_groups(torch.tensor([[0.0, nan, 2.0], [nan, 1.0, nan], [1.0, 1.0, nan]])).tolist() == [False, True, True]


def test_compute_rewards_wrong_length_names_function():
    fns = {"short": (lambda texts, rows: [1.0], 1.0)}
    with pytest.raises(ValueError, match="'short'.*returned 1 values for 2 completions"):
        compute_rewards(fns, ["a", "b"], [ROW, ROW])


def test_compute_rewards_none_and_bad_type():
    values = compute_rewards({"maybe": (lambda texts, rows: [None, 2], 1.0)}, ["a", "b"], [ROW, ROW])
    assert values["maybe"][0].isnan()
    assert values["maybe"][1].item() == 2.0
    with pytest.raises(ValueError, match="'text'.*'yes'"):
        compute_rewards({"text": (lambda texts, rows: ["yes", 1], 1.0)}, ["a", "b"], [ROW, ROW])


# ---------------------------------------------------------------------------------------------
# micro-batches and the loss


ROWS = [ROW, Row(question="Ben has 3 pens. He finds 9 more. How many pens does Ben have now?", answer="12",
                 reasoning="3 + 9 = 12.", source="t:1")]


def fake_rollouts(tok, completions, rewards_, stopped=None, G=2, prompts=None):
    """Rollouts with chosen completions, rewards and truncation flags; sampler log-probs are 0."""
    B = len(completions)
    prompts = prompts or [prompt_ids(tok, format_prompt("synthetic", ROWS[(i // G) % 2])) for i in range(B)]
    stopped = stopped or [c[-1] == tok.eos_id for c in completions]
    total = torch.tensor(rewards_, dtype=torch.float32)
    advantages = group_advantages(total.view(-1, G), True).view(-1)
    return Rollouts([ROWS[(i // G) % 2] for i in range(B)], prompts, completions, [""] * B,
                    [rollout_sequence(tok, p, c, s) for p, c, s in zip(prompts, completions, stopped)],
                    [torch.zeros(len(c)) for c in completions], stopped, {"total": total}, total, [None] * B,
                    flat_groups(total.view(-1, G)).repeat_interleave(G), advantages, advantages)


def some_completions(tok, n, seed=0):
    rng = torch.Generator().manual_seed(seed)
    body = tok.encode(gold_completion(ROW))
    out = []
    for i in range(n):
        length = int(torch.randint(2, len(body), (1,), generator=rng))
        out.append(body[:length] + [tok.marker_id] + tok.encode("<reward>2</reward>") + [tok.eos_id])
    return out


@pytest.fixture(scope="module")
def small_model(tok):
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights(seed=3)
    return model


def gradients(model, ref, rollouts, cfg):
    model.zero_grad(set_to_none=True)
    stats = grpo_backward(model, ref, micro_batches(rollouts, cfg, "cpu"), cfg)
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), stats


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_gradient_independent_of_micro_batches(tok, small_model, mode):
    completions = some_completions(tok, 8)
    rollouts = fake_rollouts(tok, completions, [0, 1, 2, 2, 1, 1, 0, 3])
    ref = copy.deepcopy(small_model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    results = [gradients(small_model, ref, rollouts, GRPOConfig(micro_batch_size=m, loss_agg=mode, max_new_tokens=40))
               for m in (0, 1, 3)]
    for grad, stats in results[1:]:
        torch.testing.assert_close(grad, results[0][0], atol=2e-6, rtol=1e-4)
        assert stats["grpo_loss"] == pytest.approx(results[0][1]["grpo_loss"], abs=1e-6)
        assert stats["grpo_kl"] == pytest.approx(results[0][1]["grpo_kl"], abs=1e-7)


def test_pad_equal_to_eos_keeps_eos_and_marker(tok):
    completion = some_completions(tok, 1)[0]
    prompt = prompt_ids(tok, "Q\n")
    sequence = rollout_sequence(tok, prompt, completion, True)
    short = rollout_sequence(tok, prompt, completion[:3], False)
    input_ids, segment_ids = collate([sequence, short], pad_id=tok.eos_id)
    mask = target_mask(segment_ids, COMPLETION)
    targets = input_ids[:, 1:]
    assert mask[0].sum() == len(completion)
    assert mask[0][targets[0] == tok.eos_id].sum() == 1  # the real EOS, weight 1
    assert mask[0][targets[0] == tok.marker_id].sum() == 1
    assert mask[1].sum() == 3  # the padding (EOS ids too) is not in the mask


def test_first_inner_step_ratio_exactly_one(tok, small_model):
    rollouts = fake_rollouts(tok, some_completions(tok, 4), [0, 1, 2, 0])
    cfg = GRPOConfig(micro_batch_size=3)
    _, stats = gradients(small_model, None, rollouts, cfg)
    assert stats["grpo_ratio"] == 1.0
    assert stats["grpo_clip_low"] == 0.0
    assert stats["grpo_clip_high"] == 0.0


def test_inner_steps_reuse_old_logprobs(tok):
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights(seed=4)
    cfg = GRPOConfig(inner_steps=3, clip_low=0.01, clip_high=0.01)
    batches = micro_batches(fake_rollouts(tok, some_completions(tok, 4), [0, 1, 2, 0]), cfg, "cpu")
    optimizer = torch.optim.SGD(model.parameters(), lr=5.0)
    ratios = []
    for _ in range(cfg.inner_steps):
        optimizer.zero_grad()
        stats = grpo_backward(model, None, batches, cfg)
        optimizer.step()
        ratios.append(stats)
    assert ratios[0]["grpo_ratio"] == 1.0
    assert ratios[2]["grpo_ratio"] != 1.0  # the policy moved away from the old log-probs
    assert ratios[2]["grpo_clip_low"] + ratios[2]["grpo_clip_high"] > 0


def test_truncated_completions_masked(tok, small_model):
    completions = some_completions(tok, 4)
    completions[1] = completions[1][:5]  # cut by the length limit
    rollouts = fake_rollouts(tok, completions, [0, 1, 2, 0], stopped=[True, False, True, True])
    masked = micro_batches(rollouts, GRPOConfig(mask_truncated=True), "cpu")[0]
    kept = micro_batches(rollouts, GRPOConfig(), "cpu")[0]
    assert masked.mask[1].sum() == 0
    assert kept.mask[1].sum() == 5
    assert torch.equal(masked.mask[[0, 2, 3]], kept.mask[[0, 2, 3]])
    stats = rollout_stats(rollouts, 2, mask_truncated=True)
    assert stats["truncated"] == 0.25
    assert stats["completion_length_min"] == min(len(completions[i]) for i in (0, 2, 3))


def test_all_truncated_gives_zero_loss(tok, small_model):
    completions = [c[:4] for c in some_completions(tok, 4)]
    rollouts = fake_rollouts(tok, completions, [0, 1, 2, 0], stopped=[False] * 4)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        grad, stats = gradients(small_model, copy.deepcopy(small_model), rollouts,
                                GRPOConfig(mask_truncated=True, loss_agg=mode))
        assert stats["grpo_loss"] == 0.0
        assert stats["grpo_tokens"] == 0
        assert torch.equal(grad, torch.zeros_like(grad))
        assert all(math.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("kl_on_flat", [True, False])
def test_kl_on_flat_groups_flag(tok, small_model, kl_on_flat):
    # group 0 is flat (rewards 1, 1), group 1 is not
    rollouts = fake_rollouts(tok, some_completions(tok, 4), [1, 1, 0, 2])
    ref = copy.deepcopy(small_model)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = GRPOConfig(kl_on_flat_groups=kl_on_flat, kl_coef=0.5)
    flat_only = Rollouts(*[getattr(rollouts, f.name)[:2] if f.name not in ("rewards",) else rollouts.rewards
                           for f in dataclasses.fields(Rollouts)])
    grad, _ = gradients(small_model, ref, flat_only, cfg)
    assert (grad.abs().sum() > 0) == kl_on_flat


def test_completion_logprobs_same_alone_and_in_batch(tok, small_model):
    completion = some_completions(tok, 1)[0]
    short = prompt_ids(tok, "Q\n")
    long = prompt_ids(tok, format_prompt("synthetic", ROWS[1]) * 3)
    alone = micro_batches(fake_rollouts(tok, [completion], [0], G=1, prompts=[short]), GRPOConfig(group_size=1), "cpu")[0]
    mixed = micro_batches(fake_rollouts(tok, [completion, completion], [0, 1], G=2, prompts=[short, long]),
                          GRPOConfig(), "cpu")[0]
    with torch.no_grad():
        def logprobs(b):
            return token_logprobs(small_model(b.input_ids)[:, :-1], b.input_ids[:, 1:])[b.mask]
        a = logprobs(alone)
        m = token_logprobs(small_model(mixed.input_ids)[:, :-1], mixed.input_ids[:, 1:])[0][mixed.mask[0]]
    torch.testing.assert_close(a, m, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def random_rollouts(tok):
    torch.manual_seed(1)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights(seed=1)
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=12, temperature=0.7)
    rollouts = collect_rollouts(model, tok, "synthetic", ROWS, cfg, WEIGHTS, generator=torch.Generator().manual_seed(0))
    return model, cfg, rollouts


def test_sampler_logprobs_align_with_targets(tok, random_rollouts):
    model, cfg, rollouts = random_rollouts
    batch = micro_batches(rollouts, cfg, "cpu")[0]
    for b, (prompt, completion) in enumerate(zip(rollouts.prompts, rollouts.completions)):
        start = len(prompt) - 1
        assert torch.equal(batch.input_ids[b, start + 1:start + 1 + len(completion)], torch.tensor(completion))
        assert batch.mask[b].sum() == len(completion)
        assert torch.equal(batch.sampler_logprobs[b, start:start + len(completion)], rollouts.sampler_logprobs[b])


def test_sampler_logprobs_match_training_forward(tok, random_rollouts):
    # same temperature in both, so the first ratio against the sampler would be 1 up to float error
    model, cfg, rollouts = random_rollouts
    model.zero_grad(set_to_none=True)
    stats = grpo_backward(model, None, micro_batches(rollouts, cfg, "cpu"), cfg)
    assert stats["grpo_sampler_logprob_error"] < 1e-5
    assert stats["grpo_ratio"] == 1.0


def test_rollout_stats_keys(tok, random_rollouts):
    _, cfg, rollouts = random_rollouts
    stats = rollout_stats(rollouts, cfg.group_size)
    for name in ("accuracy", "format", "consistency"):
        assert 0 <= stats[f"reward_{name}"] <= 1
        assert stats[f"reward_{name}_std"] >= 0
    assert stats["reward_unparseable"] == sum(p is None for p in rollouts.predicted) / len(rollouts.predicted)
    assert stats["completion_length_min"] <= stats["completion_length"] <= stats["completion_length_max"] <= 12


def test_split_advantage_by_marker(tok):
    prompt = prompt_ids(tok, "Q\n")
    completion = tok.encode(gold_completion(ROW)) + [tok.marker_id] + tok.encode("<reward>1</reward>") + [tok.eos_id]
    rollouts = fake_rollouts(tok, [completion], [0.0], G=1, prompts=[prompt])
    rollouts.advantage_before, rollouts.advantage_after = torch.tensor([0.5]), torch.tensor([-2.0])
    batch = micro_batches(rollouts, GRPOConfig(group_size=1), "cpu")[0]
    collated = collate(rollouts.sequences, pad_id=0)[1]
    before = target_mask(collated, (Segment.REASONING, Segment.MARKER))
    assert (batch.advantages[before] == 0.5).all()
    assert (batch.advantages[batch.mask & ~before] == -2.0).all()
    assert (batch.mask & ~before).sum() == len(completion) - completion.index(tok.marker_id) - 1

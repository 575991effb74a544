import pytest
import torch

from data import Row, format_prompt
from eval.evaluate import evaluate
from model.config import ModelConfig
from model.transformer import Transformer
from pcl import rewards
from pcl.grpo import GRPOConfig, Rollouts, collect_rollouts, completion_tensors, group_advantages, grpo_loss
from pcl.losses import token_cross_entropy
from pcl.sequence import (COMPLETION, Segment, collate, evaluation_track, prompt_ids, rollout_sequence,
                          target_mask)
from pcl.sft import gold_completion

ROW = Row(question="Ann has 12 apples. She buys 7 more. How many apples does Ann have now?",
          answer="19", reasoning="12 + 7 = 19.", source="test:0")
WEIGHTS = rewards.RewardWeights()


@pytest.fixture(scope="module")
def memorized(tok):
    """A tiny model trained to write one full post-completion sequence for ROW."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights(seed=0)
    prompt = prompt_ids(tok, format_prompt("synthetic", ROW))
    evaluation, reward = rewards.render_evaluation(1, 1, WEIGHTS)
    sequence = evaluation_track(tok, prompt, tok.encode(gold_completion(ROW)), evaluation, reward)
    input_ids, segment_ids = collate([sequence], tok.pad_id)
    mask = target_mask(segment_ids, COMPLETION)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = token_cross_entropy(model(input_ids)[:, :-1], input_ids[:, 1:], mask) / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.01, "the fixture model did not memorise its sequence"
    return model.eval(), prompt, sequence


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


def test_rollouts_continue_to_eos(tok, memorized):
    model, prompt, sequence = memorized
    cfg = GRPOConfig(group_size=2, prompts_per_step=1, max_new_tokens=64, temperature=0.0)
    rollouts = collect_rollouts(model, tok, "synthetic", [ROW], cfg, WEIGHTS)
    completion = rollouts.completions[0]
    assert completion == sequence.input_ids[len(prompt):]
    assert completion[-1] == tok.eos_id
    assert tok.marker_id in completion[:-1]
    assert rollouts.stopped == [True, True]
    assert rollouts.scores[0].consistency == 1.0
    assert rollouts.scores[0].rl == 3.0


def test_rollout_segments_match_builder(tok, memorized):
    model, prompt, sequence = memorized
    cfg = GRPOConfig(group_size=2, prompts_per_step=1, max_new_tokens=64, temperature=0.0)
    rollouts = collect_rollouts(model, tok, "synthetic", [ROW], cfg, WEIGHTS)
    assert rollouts.sequences[0].segment_ids == sequence.segment_ids


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
    assert not advantages.isnan().any()


@pytest.fixture(scope="module")
def random_rollouts(tok):
    torch.manual_seed(1)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights(seed=1)
    cfg = GRPOConfig(group_size=4, prompts_per_step=2, max_new_tokens=12, temperature=1.0)
    rows = [ROW, Row(question="Ben has 3 pens. How many pens?", answer="3", reasoning="3 = 3.", source="t:1")]
    rollouts = collect_rollouts(model, tok, "synthetic", rows, cfg, WEIGHTS,
                                generator=torch.Generator().manual_seed(0))
    return model, cfg, rollouts


def test_old_logprobs_align_with_targets(tok, random_rollouts):
    model, _, rollouts = random_rollouts
    input_ids, segment_ids, old_logprobs, _, mask = completion_tensors(rollouts, "cpu")
    for b, (prompt, completion) in enumerate(zip(rollouts.prompts, rollouts.completions)):
        start = len(prompt) - 1
        assert torch.equal(input_ids[b, start + 1:start + 1 + len(completion)], torch.tensor(completion))
        assert mask[b].sum() == len(completion)
        assert torch.equal(old_logprobs[b, start:start + len(completion)], rollouts.old_logprobs[b])


def test_first_step_ratio_is_one(tok, random_rollouts):
    model, cfg, rollouts = random_rollouts
    _, stats = grpo_loss(model, None, rollouts, cfg)
    assert abs(stats["grpo_ratio"] - 1.0) < 1e-5
    assert stats["grpo_clipped"] == 0.0


def test_split_advantage_by_marker(tok):
    prompt = prompt_ids(tok, "Q\n")
    completion = tok.encode(gold_completion(ROW)) + [tok.marker_id] + tok.encode("<reward>1</reward>") + [tok.eos_id]
    sequence = rollout_sequence(tok, prompt, completion, True)
    rollouts = Rollouts([ROW], [prompt], [completion], [sequence], [torch.zeros(len(completion))], [True], [None],
                        advantage_before=torch.tensor([0.5]), advantage_after=torch.tensor([-2.0]))
    _, segment_ids, _, advantages, mask = completion_tensors(rollouts, "cpu")
    before = target_mask(segment_ids, (Segment.REASONING, Segment.MARKER))
    assert (advantages[before] == 0.5).all()
    assert (advantages[mask & ~before] == -2.0).all()
    assert (mask & ~before).sum() == len(completion) - completion.index(tok.marker_id) - 1

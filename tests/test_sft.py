import json
import random

import pytest
import torch

from data import Row, format_prompt
from model.config import ModelConfig
from model.transformer import Transformer
from pcl import losses, rewards
from pcl.sequence import EVALUATION_TRACK, REASONING_TRACK, Segment, collate, prompt_ids, reasoning_track, target_mask
from pcl.sft import (EvaluationTrack, ScoreHead, SFTConfig, corrupt_completion, gold_completion, sft_backward,
                     sft_counts, sft_loss)

ROWS = [Row(question=f"Ann has {a} apples. She buys {b} more. How many apples does Ann have now?",
            answer=str(a + b), reasoning=f"{a} + {b} = {a + b}.", source=f"test:{a}") for a in range(3, 15)
        for b in (2, 7)]
WEIGHTS = rewards.RewardWeights()


def test_gold_completion_scores_full():
    scores = rewards.score("synthetic", gold_completion(ROWS[0]), ROWS[0].answer, WEIGHTS)
    assert scores.accuracy == 1
    assert scores.format == 1


def test_corruptions_lose_reward():
    rng = random.Random(0)
    for row in ROWS:
        text = corrupt_completion("synthetic", row, rng)
        scores = rewards.score("synthetic", text, row.answer, WEIGHTS)
        assert scores.total < WEIGHTS.max_reward, text


def test_corruptions_cover_both_rules():
    rng = random.Random(0)
    scores = [rewards.score("synthetic", corrupt_completion("synthetic", row, rng), row.answer, WEIGHTS)
              for row in ROWS * 4]
    assert any(s.accuracy == 0 and s.format == 1 for s in scores)
    assert any(s.format == 0 for s in scores)


def test_wrong_number_corruption_changes_reasoning_too():
    rng = random.Random(3)
    row = Row(question="q", answer="14", reasoning="12 + 7 = 19. 19 - 5 = 14.", source="t")
    texts = [corrupt_completion("synthetic", row, rng) for _ in range(20)]
    wrong_answers = [t for t in texts if "<answer>14</answer>" not in t and t.endswith("</answer>")
                     and "<answer></answer>" not in t]
    assert wrong_answers
    for text in wrong_answers:
        answer = rewards.extract_answer(text)
        assert f"= {answer}.</think>" in text


def test_corruption_strategyqa_flips_answer():
    row = Row(question="q", answer="yes", reasoning="r.", source="t")
    rng = random.Random(0)
    texts = [corrupt_completion("strategyqa", row, rng) for _ in range(10)]
    assert any(rewards.extract_answer(t) == "no" for t in texts)


def test_cold_start_fills_both_classes(tok):
    track = EvaluationTrack(tok, "synthetic", WEIGHTS, pool_size=100)
    track.cold_start(ROWS, random.Random(0))
    stats = track.stats()
    assert stats["pool_right"] >= len(ROWS)
    assert stats["pool_wrong"] > 0
    assert stats["added_cold_start"] == 2 * len(ROWS)


def test_sample_is_balanced(tok):
    track = EvaluationTrack(tok, "synthetic", WEIGHTS, pool_size=100, balance=True)
    track.cold_start(ROWS, random.Random(0))
    batch = track.sample(10, random.Random(1))
    assert sum(e.correct for e in batch) == 5


def test_unbalanced_sample_follows_pool(tok):
    track = EvaluationTrack(tok, "synthetic", WEIGHTS, pool_size=100)
    prompt = prompt_ids(tok, "q\n")
    for row in ROWS[:3]:
        track.add(row, prompt, tok.encode(gold_completion(row)))
    track.add(ROWS[0], prompt, tok.encode("<think>x</think><answer>0</answer>"))
    batch = track.sample(400, random.Random(1))
    assert 250 < sum(e.correct for e in batch) < 350


def test_pool_keeps_newest(tok):
    track = EvaluationTrack(tok, "synthetic", WEIGHTS, pool_size=3)
    prompt = prompt_ids(tok, "q\n")
    for row in ROWS[:5]:
        track.add(row, prompt, tok.encode(gold_completion(row)))
    assert len(track.pool) == 3
    assert gold_completion(ROWS[4]) in tok.decode(track.pool[-1].sequence.input_ids)


def test_state_dict_round_trip(tok):
    track = EvaluationTrack(tok, "synthetic", WEIGHTS, pool_size=20)
    track.cold_start(ROWS, random.Random(0))
    state = json.loads(json.dumps(track.state_dict()))  # as a checkpoint stores it
    restored = EvaluationTrack(tok, "synthetic", WEIGHTS, pool_size=20)
    restored.load_state_dict(state)
    assert restored.pool == track.pool
    assert restored.stats() == track.stats()
    assert restored.sample(8, random.Random(5)) == track.sample(8, random.Random(5))


def test_evaluation_track_targets_follow_marker(tok):
    track = EvaluationTrack(tok, "synthetic", WEIGHTS, pool_size=10)
    row = ROWS[0]
    prompt = prompt_ids(tok, format_prompt("synthetic", row))
    example = track.add(row, prompt, tok.encode("<think>3 + 2 = 6.</think><answer>6</answer>"))
    assert example.reward == 1.0
    assert not example.correct
    text = tok.decode(example.sequence.input_ids)
    assert "accuracy: 0" in text
    assert text.endswith("<reward>1</reward>" + tok.eos_token)


def test_score_head_candidates(tok):
    head = ScoreHead(tok, WEIGHTS, "cpu")
    assert head.values.tolist() == [0.0, 1.0, 2.0]
    assert [tok.decode([i]) for i in head.ids.tolist()] == ["0", "1", "2"]


def test_score_head_rejects_multi_token_values(tok):
    with pytest.raises(ValueError, match="one token per value"):
        ScoreHead(tok, rewards.RewardWeights(accuracy=0.5), "cpu")


@pytest.fixture(scope="module")
def batch(tok):
    track = EvaluationTrack(tok, "synthetic", WEIGHTS, pool_size=50)
    track.cold_start(ROWS, random.Random(0))
    reasoning = [reasoning_track(tok, prompt_ids(tok, format_prompt("synthetic", r)), gold_completion(r))
                 for r in ROWS[:4]]
    return reasoning, track.sample(4, random.Random(0))


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("chunk_from", [0, None], ids=["chunked", "plain"])
def test_fused_and_reference_agree(tok, batch, compile, chunk_from, monkeypatch):
    if chunk_from is not None:  # the test's logits are far below the size that chunks by default
        monkeypatch.setattr(losses, "CHUNKED_CROSS_ENTROPY_MIN_LOGITS", chunk_from)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights(seed=0)
    head = ScoreHead(tok, WEIGHTS, "cpu")
    values, grads, terms = [], [], []
    for reference in (True, False):
        model.zero_grad()
        loss, stats = sft_loss(model, *batch, head, SFTConfig(), tok.pad_id, compile=compile, reference=reference)
        loss.backward()
        values.append(loss.item())
        grads.append(model.lm_head.weight.grad.clone())
        terms.append([stats[key] for key in ("sft_reason", "sft_eval", "sft_score")])
    assert abs(values[0] - values[1]) < 1e-5
    assert terms[0] == pytest.approx(terms[1], abs=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_token_counts_follow_segments(tok, batch):
    reasoning, evaluation = batch
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights(seed=0)
    _, stats = sft_loss(model, reasoning, evaluation, None, SFTConfig(), tok.pad_id, compile=False)
    reason = sum(s.segment_ids.count(Segment.REASONING) + s.segment_ids.count(Segment.MARKER) for s in reasoning)
    graded = sum(e.sequence.segment_ids.count(s) for e in evaluation
                 for s in (Segment.EVALUATION, Segment.SCORE, Segment.EOS))
    assert stats["sft_tokens"] == reason + graded


def test_evaluation_completion_not_trained(tok, batch):
    """The evaluation-track mask never selects the prompt, the graded completion or the marker."""
    _, evaluation = batch
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights(seed=0)
    cfg = SFTConfig(lambda_score=0.0)
    input_ids, segment_ids = collate([e.sequence for e in evaluation], tok.pad_id)
    mask = target_mask(segment_ids, EVALUATION_TRACK)
    completion = target_mask(segment_ids, [Segment.REASONING, Segment.MARKER, Segment.PROMPT])
    assert not (mask & completion).any()
    loss, _ = sft_loss(model, [], evaluation, None, cfg, tok.pad_id, compile=False)
    assert torch.isfinite(loss)


def test_counts_from_segments(tok, batch):
    reasoning, evaluation = batch
    counts = sft_counts(reasoning, evaluation)
    reason_ids, reason_segments = collate(reasoning, tok.pad_id)
    eval_ids, eval_segments = collate([e.sequence for e in evaluation], tok.pad_id)
    assert counts["reason"] == target_mask(reason_segments, REASONING_TRACK).sum()
    assert counts["eval"] == target_mask(eval_segments, EVALUATION_TRACK).sum()
    assert counts["score"] == len(evaluation)  # every evaluation row has one score


@pytest.mark.parametrize("micro_batch_size", [1, 3, 5])
def test_gradient_independent_of_micro_batches(tok, batch, micro_batch_size):
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights(seed=0)
    head = ScoreHead(tok, WEIGHTS, "cpu")

    def grads(size):
        model.zero_grad(set_to_none=True)
        stats = sft_backward(model, *batch, head, SFTConfig(), tok.pad_id, size, scale=0.5, compile=False)
        return torch.cat([p.grad.flatten() for p in model.parameters()]), stats

    whole, whole_stats = grads(0)
    split, split_stats = grads(micro_batch_size)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-4)
    for key in ("sft_loss", "sft_reason", "sft_eval", "sft_score", "sft_tokens"):
        assert split_stats[key] == pytest.approx(whole_stats[key], abs=1e-6), key
    # the whole batch in one pass is the plain sft_loss, scaled
    model.zero_grad(set_to_none=True)
    loss, _ = sft_loss(model, *batch, head, SFTConfig(), tok.pad_id, compile=False)
    (0.5 * loss).backward()
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in model.parameters()]), whole)

import pytest
import torch

from model.tokenizer import EOS_TOKEN, MARKER, REWARD, REWARD_END, Tokenizer
from pcl.sequence import (COMPLETION, EVALUATION_TRACK, REASONING_TRACK, Segment, Sequence, build, collate,
                          completion_text, evaluation_track, first_score_mask, prompt_ids, reasoning_track,
                          rollout_sequence, target_mask)

P, R, M, E, S, X = (Segment.PROMPT, Segment.REASONING, Segment.MARKER, Segment.EVALUATION, Segment.SCORE,
                    Segment.EOS)


def runs(segment_ids) -> list[Segment]:
    """The segments of `segment_ids` in order, each run of equal ids collapsed to one entry."""
    out = []
    for s in segment_ids:
        if not out or out[-1] != s:
            out.append(Segment(s))
    return out


def ids_of(sequence: Sequence, segment: Segment) -> list[int]:
    return [i for i, s in zip(sequence.input_ids, sequence.segment_ids) if s == segment]


# ---------------------------------------------------------------------------------------------
# build


def test_build_segments():
    sequence = build([(P, [1, 2]), (R, [3]), (M, [4]), (E, []), (X, [5])])
    assert sequence.input_ids == [1, 2, 3, 4, 5]
    assert sequence.segment_ids == [int(P), int(P), int(R), int(M), int(X)]


def test_build_empty():
    assert len(build([])) == 0


def test_sequence_length_mismatch():
    with pytest.raises(ValueError, match="3 ids but 2 segment ids"):
        Sequence([1, 2, 3], [1, 1])


# ---------------------------------------------------------------------------------------------
# Tracks


def test_prompt_ids_no_bos(tok):
    assert prompt_ids(tok, "Ann has 12 apples.") == tok.encode("Ann has 12 apples.")


@pytest.fixture(scope="module")
def llama_like():
    """A word-level tokenizer whose post-processor prepends <s>, as Llama's does."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors
    tk = HFTokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3, "there": 4}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return Tokenizer(tk, "</s>")


@pytest.mark.parametrize("prompt", ["hi there", "<s>hi there", "<s> hi"])
def test_prompt_has_bos_once(llama_like, prompt):
    ids = prompt_ids(llama_like, prompt)
    assert llama_like.bos_id == 1
    assert ids[0] == 1 and ids.count(1) == 1


def test_reasoning_track(tok):
    prompt = prompt_ids(tok, "Ann has 12 apples.")
    completion = completion_text("12 + 7 = 19.", "19")
    sequence = reasoning_track(tok, prompt, completion)
    assert sequence.input_ids[-1] == tok.marker_id
    assert runs(sequence.segment_ids) == [P, R, M]
    assert ids_of(sequence, P) == prompt
    assert ids_of(sequence, R) == tok.encode(completion)
    assert ids_of(sequence, M) == [tok.marker_id]


def test_reasoning_track_without_post_completion(tok):
    prompt = prompt_ids(tok, "Ann has 12 apples.")
    completion = completion_text("12 + 7 = 19.", "19")
    sequence = reasoning_track(tok, prompt, completion, post_completion=False)
    assert runs(sequence.segment_ids) == [P, R, X]
    assert ids_of(sequence, R) == tok.encode(completion)
    assert ids_of(sequence, X) == [tok.eos_id]
    assert tok.marker_id not in sequence.input_ids


def test_reasoning_track_mask_trains_eos(tok):
    plain = reasoning_track(tok, [7, 8], completion_text("a", "b"), post_completion=False)
    _, segment_ids = collate([plain], tok.pad_id)
    mask = target_mask(segment_ids, REASONING_TRACK)
    assert mask[0, -1].item() is True  # the logits before the last id predict EOS
    assert mask.sum().item() == len(plain) - 2  # every id but the two prompt ids


def test_completion_text():
    assert completion_text("a", "b") == "<think>a</think><answer>b</answer>"


def test_evaluation_track(tok):
    prompt = prompt_ids(tok, "Ann has 12 apples.")
    completion = tok.encode(completion_text("12 + 7 = 19.", "18"))
    sequence = evaluation_track(tok, prompt, completion, "format: 1\naccuracy: 0\ntotal: 1", "1")
    assert runs(sequence.segment_ids) == [P, R, M, E, S, E, X]
    assert ids_of(sequence, S) == tok.encode("1")
    assert ids_of(sequence, R) == completion
    assert ids_of(sequence, X) == [tok.eos_id]
    assert sequence.input_ids[-1] == tok.eos_id


def test_evaluation_track_score_neighbours(tok):
    sequence = evaluation_track(tok, [7], [8], "total: 2", "2")
    first = sequence.segment_ids.index(int(S))
    last = len(sequence.segment_ids) - 1 - sequence.segment_ids[::-1].index(int(S))
    assert sequence.input_ids[first - 1] == tok.token_id(REWARD)
    assert sequence.input_ids[last + 1] == tok.token_id(REWARD_END)
    assert sequence.segment_ids[last + 1] == int(E)


def test_evaluation_track_multi_token_score(tok):
    sequence = evaluation_track(tok, [7], [8], "total: 12", "12")
    assert ids_of(sequence, S) == tok.encode("12")
    assert len(ids_of(sequence, S)) == 2


def test_evaluation_track_text(tok):
    sequence = evaluation_track(tok, [], tok.encode("<think>x</think><answer>1</answer>"), "ok", "2")
    assert tok.decode(sequence.input_ids) == (
        f"<think>x</think><answer>1</answer>{MARKER}<evaluation>ok</evaluation><reward>2</reward>{EOS_TOKEN}"
    )


# ---------------------------------------------------------------------------------------------
# rollout_sequence


@pytest.fixture
def special(tok):
    return {"marker": tok.marker_id, "reward": tok.token_id(REWARD), "reward_end": tok.token_id(REWARD_END),
            "eos": tok.eos_id}


def test_rollout_full(tok, special):
    m, r, re, eos = special["marker"], special["reward"], special["reward_end"], special["eos"]
    completion = [20, 21, 22, m, 30, 31, r, 40, 41, re, eos]
    sequence = rollout_sequence(tok, [1, 2], completion, stopped=True)
    assert sequence.input_ids == [1, 2] + completion
    assert sequence.segment_ids == [int(s) for s in [P, P, R, R, R, M, E, E, E, S, S, E, X]]


def test_rollout_truncated_no_eos_segment(tok, special):
    m, r, re = special["marker"], special["reward"], special["reward_end"]
    completion = [20, m, 30, r, 40, re, 50]
    sequence = rollout_sequence(tok, [1], completion, stopped=False)
    assert sequence.segment_ids == [int(s) for s in [P, R, M, E, E, S, E, E]]


def test_rollout_truncated_ending_in_eos_id(tok, special):
    # an eos id that did not stop the row (stopped False) is ordinary evaluation text
    m, eos = special["marker"], special["eos"]
    sequence = rollout_sequence(tok, [], [20, m, 30, eos], stopped=False)
    assert int(X) not in sequence.segment_ids
    assert sequence.segment_ids[-1] == int(E)


def test_rollout_no_marker(tok):
    sequence = rollout_sequence(tok, [1], [20, 21, 22], stopped=False)
    assert sequence.segment_ids == [int(P), int(R), int(R), int(R)]


def test_rollout_no_marker_stopped_at_eos(tok, special):
    sequence = rollout_sequence(tok, [1], [20, 21, special["eos"]], stopped=True)
    assert sequence.segment_ids == [int(s) for s in [P, R, R, X]]


def test_rollout_stopped_at_marker(tok, special):
    # inference stops at the marker: nothing after it
    sequence = rollout_sequence(tok, [1], [20, 21, special["marker"]], stopped=True)
    assert sequence.segment_ids == [int(s) for s in [P, R, R, M]]


def test_rollout_second_marker_is_evaluation(tok, special):
    m, eos = special["marker"], special["eos"]
    sequence = rollout_sequence(tok, [], [20, m, 30, m, eos], stopped=True)
    assert sequence.segment_ids == [int(s) for s in [R, M, E, E, X]]


def test_rollout_unclosed_reward_no_score(tok, special):
    m, r = special["marker"], special["reward"]
    sequence = rollout_sequence(tok, [], [20, m, r, 40, 41], stopped=False)
    assert int(S) not in sequence.segment_ids


def test_rollout_reward_end_only_after_eos_no_score(tok, special):
    # the closing tag must come before the final EOS to delimit a score
    m, r, eos = special["marker"], special["reward"], special["eos"]
    sequence = rollout_sequence(tok, [], [20, m, r, 40, eos], stopped=True)
    assert int(S) not in sequence.segment_ids
    assert sequence.segment_ids[-1] == int(X)


def test_rollout_first_reward_only(tok, special):
    m, r, re = special["marker"], special["reward"], special["reward_end"]
    completion = [m, r, 40, re, r, 41, re]
    sequence = rollout_sequence(tok, [], completion, stopped=False)
    assert sequence.segment_ids == [int(s) for s in [M, E, S, E, E, E, E]]


def test_rollout_reward_before_marker_ignored(tok, special):
    m, r, re = special["marker"], special["reward"], special["reward_end"]
    sequence = rollout_sequence(tok, [], [r, 40, re, m, 30], stopped=False)
    assert sequence.segment_ids == [int(s) for s in [R, R, R, M, E]]


def test_rollout_empty_completion(tok):
    sequence = rollout_sequence(tok, [1, 2], [], stopped=False)
    assert sequence.segment_ids == [int(P), int(P)]


def test_rollout_matches_evaluation_track(tok):
    # a sampled completion that spells out an evaluation-track sequence is segmented the same way
    prompt = [7, 8]
    completion = tok.encode(completion_text("1 + 1 = 2.", "2"))
    built = evaluation_track(tok, prompt, completion, "total: 2", "2")
    sampled = rollout_sequence(tok, prompt, built.input_ids[len(prompt):], stopped=True)
    assert sampled.segment_ids == built.segment_ids


# ---------------------------------------------------------------------------------------------
# collate and masks


def test_collate_pads(tok):
    sequences = [build([(P, [1, 2]), (R, [3, 4, 5])]), build([(P, [6]), (R, [7])])]
    input_ids, segment_ids = collate(sequences, pad_id=99)
    assert input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 99, 99, 99]]
    assert segment_ids.tolist() == [[1, 1, 2, 2, 2], [1, 2, 0, 0, 0]]
    assert input_ids.dtype == torch.long
    assert segment_ids.dtype == torch.long


def test_target_mask_shifted():
    segment_ids = torch.tensor([[int(s) for s in [P, P, R, R, M, E, S, E, X, Segment.PAD]]])
    mask = target_mask(segment_ids, REASONING_TRACK)
    # mask[t] is True when input t + 1 is a target; the reasoning track trains its stop token,
    # which is the marker or, without post-completion, EOS
    assert mask.tolist() == [[False, True, True, True, False, False, False, True, False]]


def test_target_mask_evaluation_track():
    segment_ids = torch.tensor([[int(s) for s in [P, R, M, E, S, E, X, Segment.PAD]]])
    assert target_mask(segment_ids, EVALUATION_TRACK).tolist() == [[False, False, True, True, True, True, False]]


def test_target_mask_completion():
    segment_ids = torch.tensor([[int(s) for s in [P, P, R, M, E, S, E, X, Segment.PAD, Segment.PAD]]])
    expected = [[False, True, True, True, True, True, True, False, False]]
    assert target_mask(segment_ids, COMPLETION).tolist() == expected


def test_pad_equal_to_eos_keeps_eos_target(tok):
    # a tokenizer without a pad token pads with its EOS id
    tokenizer = Tokenizer(tok.tk, EOS_TOKEN)
    assert tokenizer.pad_id == tokenizer.eos_id
    long = evaluation_track(tokenizer, [7, 8, 9], [10, 11], "total: 2", "2")
    short = evaluation_track(tokenizer, [7], [10], "total: 1", "1")
    input_ids, segment_ids = collate([long, short], tokenizer.pad_id)
    mask = target_mask(segment_ids, EVALUATION_TRACK)
    targets = input_ids[:, 1:]
    for row, sequence in enumerate((long, short)):
        eos_target = len(sequence) - 2  # logits at len - 2 predict the final EOS
        assert mask[row, eos_target].item() is True, f"row {row}"
        assert targets[row, eos_target].item() == tokenizer.eos_id, f"row {row}"
        assert mask[row, eos_target + 1:].sum().item() == 0, f"row {row}"


def test_pad_equal_to_eos_mask_counts(tok):
    tokenizer = Tokenizer(tok.tk, EOS_TOKEN)
    long = evaluation_track(tokenizer, [7, 8, 9], [10, 11], "total: 2", "2")
    short = evaluation_track(tokenizer, [7], [10], "total: 1", "1")
    _, segment_ids = collate([long, short], tokenizer.pad_id)
    counts = target_mask(segment_ids, EVALUATION_TRACK).sum(-1).tolist()
    expected = [sum(s in [int(e) for e in EVALUATION_TRACK] for s in q.segment_ids) for q in (long, short)]
    assert counts == expected


def test_first_score_mask(tok):
    with_score = evaluation_track(tok, [7], [10], "total: 12", "12")  # two score tokens
    without = reasoning_track(tok, [7, 8], "<think>x</think>")
    _, segment_ids = collate([with_score, without, with_score], tok.pad_id)
    first = first_score_mask(segment_ids)
    assert first.sum(-1).tolist() == [1, 0, 1]
    position = first[0].nonzero().item()
    # the logits at `position` predict the first score token, input position + 1
    assert with_score.segment_ids[position + 1] == int(S)
    assert with_score.segment_ids[position] == int(E)


def test_first_score_mask_shape():
    segment_ids = torch.zeros((3, 7), dtype=torch.long)
    assert first_score_mask(segment_ids).shape == (3, 6)

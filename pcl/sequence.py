"""Post-completion sequences: token ids with one segment id per token.

    PROMPT | REASONING (<think>..</think><answer>..</answer>) | MARKER | EVALUATION | SCORE | EOS

The baselines without post-completion use the same prompt and answer tags, and their sequence
ends with EOS right after the answer: PROMPT | REASONING | EOS.

Segment ids are the only source of loss masks: a loss selects the targets whose segment it trains
on, and padding is its own segment, so a pad id equal to the EOS id cannot hide the real EOS.
"""

from dataclasses import dataclass
from enum import IntEnum

import torch

from model.tokenizer import (ANSWER, ANSWER_END, EVALUATION, EVALUATION_END, REWARD, REWARD_END, THINK,
                             THINK_END, Tokenizer)


class Segment(IntEnum):
    PAD = 0
    PROMPT = 1
    REASONING = 2  # <think>...</think><answer>...</answer>
    MARKER = 3  # <post-completion>
    EVALUATION = 4  # <evaluation>...</evaluation><reward> and the closing </reward>
    SCORE = 5  # the reward value between <reward> and </reward>
    EOS = 6


# Segments that each training signal trains on. The evaluation track must not imitate its completion,
# which may be wrong, so it trains only on what follows the marker. The reasoning track trains the
# answer and the stop token after it: the marker, or EOS in a sequence without post-completion.
REASONING_TRACK = (Segment.REASONING, Segment.MARKER, Segment.EOS)
EVALUATION_TRACK = (Segment.EVALUATION, Segment.SCORE, Segment.EOS)
COMPLETION = (Segment.REASONING, Segment.MARKER, Segment.EVALUATION, Segment.SCORE, Segment.EOS)


@dataclass
class Sequence:
    input_ids: list[int]
    segment_ids: list[int]

    def __post_init__(self):
        if len(self.input_ids) != len(self.segment_ids):
            raise ValueError(f"{len(self.input_ids)} ids but {len(self.segment_ids)} segment ids")

    def __len__(self):
        return len(self.input_ids)


def build(parts: list[tuple[Segment, list[int]]]) -> Sequence:
    """Concatenate (segment, ids) parts, giving every id its part's segment."""
    input_ids, segment_ids = [], []
    for segment, ids in parts:
        input_ids += ids
        segment_ids += [int(segment)] * len(ids)
    return Sequence(input_ids, segment_ids)


def completion_text(reasoning: str, answer: str) -> str:
    """The text a model should generate before the marker."""
    return f"{THINK}{reasoning}{THINK_END}{ANSWER}{answer}{ANSWER_END}"


def prompt_ids(tok: Tokenizer, prompt: str) -> list[int]:
    """The prompt's ids, starting with the tokenizer's BOS id (if it has one) exactly once, also when
    the prompt text itself begins with the BOS token."""
    ids = tok.encode(prompt)
    if tok.bos_id is None or ids[:1] == [tok.bos_id]:
        return ids
    return [tok.bos_id] + ids


def reasoning_track(tok: Tokenizer, prompt: list[int], completion: str, post_completion: bool = True) -> Sequence:
    """(prompt, gold completion, marker): the model learns to answer and then stop.

    Without `post_completion` the stop token is EOS, as in a model trained without PCL.
    """
    stop = (Segment.MARKER, [tok.marker_id]) if post_completion else (Segment.EOS, [tok.eos_id])
    return build([(Segment.PROMPT, prompt), (Segment.REASONING, tok.encode(completion)), stop])


def evaluation_track(tok: Tokenizer, prompt: list[int], completion: list[int], evaluation: str,
                     reward: str) -> Sequence:
    """(prompt, any completion, marker, evaluation, reward, eos): the model learns to grade."""
    return build([
        (Segment.PROMPT, prompt),
        (Segment.REASONING, completion),
        (Segment.MARKER, [tok.marker_id]),
        (Segment.EVALUATION, tok.encode(f"{EVALUATION}{evaluation}{EVALUATION_END}{REWARD}")),
        (Segment.SCORE, tok.encode(reward)),
        (Segment.EVALUATION, [tok.token_id(REWARD_END)]),
        (Segment.EOS, [tok.eos_id]),
    ])


def rollout_sequence(tok: Tokenizer, prompt: list[int], completion: list[int], stopped: bool) -> Sequence:
    """Segment a sampled completion by the positions of its special ids.

    Ids up to the first marker are REASONING, the marker is MARKER, the ids between the first
    <reward> and the next </reward> after it are SCORE, the final EOS of a stopped row is EOS, and
    the rest after the marker is EVALUATION.
    """
    segments = [Segment.REASONING] * len(completion)
    body = len(completion) - 1 if stopped and completion and completion[-1] == tok.eos_id else len(completion)
    if body < len(completion):
        segments[body] = Segment.EOS
    if tok.marker_id in completion[:body]:
        marker = completion.index(tok.marker_id)
        segments[marker] = Segment.MARKER
        reward, reward_end = tok.token_id(REWARD), tok.token_id(REWARD_END)
        after = completion[marker + 1:body]
        segments[marker + 1:body] = [Segment.EVALUATION] * len(after)
        if reward in after:
            start = marker + 1 + after.index(reward)
            if reward_end in completion[start + 1:body]:
                end = completion.index(reward_end, start + 1)
                segments[start + 1:end] = [Segment.SCORE] * (end - start - 1)
    return Sequence(prompt + completion, [int(Segment.PROMPT)] * len(prompt) + [int(s) for s in segments])


def collate(sequences: list[Sequence], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad into input_ids (B, T) and segment_ids (B, T); padding gets Segment.PAD.

    Right padding keeps every row's positions at 0..len-1, so plain causal attention is exact for
    the real tokens and no attention mask is needed.
    """
    T = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    segment_ids = torch.full((len(sequences), T), int(Segment.PAD), dtype=torch.long)
    for i, s in enumerate(sequences):
        input_ids[i, :len(s)] = torch.tensor(s.input_ids)
        segment_ids[i, :len(s)] = torch.tensor(s.segment_ids)
    return input_ids.to(device), segment_ids.to(device)


def target_mask(segment_ids: torch.Tensor, segments) -> torch.Tensor:
    """(B, T-1) bool: which next-token targets input_ids[:, 1:] belong to `segments`.

    Logits at position t predict the token at t + 1, so the mask is read off segment_ids[:, 1:].
    """
    targets = segment_ids[:, 1:]
    return torch.isin(targets, torch.tensor([int(s) for s in segments], device=segment_ids.device))


def first_score_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) bool: the target position of each row's first SCORE token (the score regression site)."""
    is_score = segment_ids[:, 1:] == int(Segment.SCORE)
    first = is_score & (is_score.long().cumsum(-1) == 1)
    return first

"""GRPO with the white-box rewards: rollouts, group advantages and the policy loss.

Rollouts sample through the post-completion part to EOS (training-time generation does not stop at
the marker), so the self-evaluation and the predicted reward are sampled and paid by the
consistency reward.

Fei et al. (2025) give every completion token the advantage of the total reward, as is the default
here. The option split_advantage departs from that: tokens up to the marker get the advantage of
the answer's reward (accuracy, format) and tokens after it the advantage of the consistency reward.

Shapes: N prompts, G samples per prompt (the group), B = N * G rows, T target positions.
"""

from dataclasses import dataclass

import torch

from data import Row, format_prompt
from model.generate import generate, sampling_logprobs
from model.tokenizer import Tokenizer
from pcl import rewards
from pcl.losses import distribution_entropy, grpo_token_loss, token_logprobs
from pcl.sequence import COMPLETION, Segment, Sequence, collate, prompt_ids, rollout_sequence, target_mask

BEFORE_MARKER = (Segment.REASONING, Segment.MARKER)


@dataclass
class GRPOConfig:
    group_size: int = 8  # G
    prompts_per_step: int = 8  # N
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    clip_eps: float = 0.2
    kl_coef: float = 0.04
    scale_rewards: bool = True  # divide advantages by the group's reward standard deviation
    split_advantage: bool = False


@dataclass
class Rollouts:
    rows: list[Row]  # (B,) the row each sample answers
    prompts: list[list[int]]  # (B,)
    completions: list[list[int]]  # (B,) sampled ids, through EOS when the row stopped
    sequences: list[Sequence]  # (B,) prompt + completion with segment ids
    old_logprobs: list[torch.Tensor]  # (B,) sampler log-probs of each completion id
    stopped: list[bool]  # (B,) False: cut by max_new_tokens
    scores: list[rewards.Scores]  # (B,)
    advantage_before: torch.Tensor  # (B,) advantage of ids up to the marker
    advantage_after: torch.Tensor  # (B,) advantage of ids after the marker


def group_advantages(rewards_: torch.Tensor, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """(N, G) rewards -> (N, G) advantages r - mean(group), divided by the group's std when `scale`.

    A group whose rewards are all equal carries no signal and gets exactly 0.
    """
    centered = rewards_ - rewards_.mean(-1, keepdim=True)
    if scale:
        std = rewards_.std(-1, keepdim=True, unbiased=False)
        centered = centered / (std + eps)
    all_equal = (rewards_ == rewards_[:, :1]).all(-1, keepdim=True)
    return torch.where(all_equal, torch.zeros_like(centered), centered)


@torch.no_grad()
def collect_rollouts(model, tok: Tokenizer, task: str, rows: list[Row], cfg: GRPOConfig,
                     weights: rewards.RewardWeights, generator: torch.Generator | None = None) -> Rollouts:
    """Sample G completions per row to EOS, score them and compute their advantages."""
    G = cfg.group_size
    prompts = [prompt_ids(tok, format_prompt(task, row)) for row in rows]
    was_training = model.training
    model.eval()
    out = generate(model, prompts, cfg.max_new_tokens, stop_ids=[tok.eos_id], pad_id=tok.pad_id,
                   num_samples=G, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator)
    model.train(was_training)

    rows_b = [row for row in rows for _ in range(G)]
    prompts_b = [p for p in prompts for _ in range(G)]
    scores = [rewards.score(task, tok.decode_completion(ids), row.answer, weights, row.options)
              for ids, row in zip(out.tokens, rows_b)]
    sequences = [rollout_sequence(tok, p, ids, s) for p, ids, s in zip(prompts_b, out.tokens, out.stopped)]

    def advantages(values):
        return group_advantages(torch.tensor(values, dtype=torch.float32).view(-1, G), cfg.scale_rewards).view(-1)

    if cfg.split_advantage:
        before = advantages([weights.accuracy * s.accuracy + weights.format * s.format for s in scores])
        after = advantages([weights.consistency * s.consistency for s in scores])
    else:
        before = after = advantages([s.rl for s in scores])
    return Rollouts(rows_b, prompts_b, out.tokens, sequences, out.logprobs, out.stopped, scores, before, after)


def completion_tensors(rollouts: Rollouts, device):
    """Pad the rollouts to (B, T+1) ids and segment ids, and align the sampler log-probs and the
    per-token advantages with the (B, T) next-token targets."""
    input_ids, segment_ids = collate(rollouts.sequences, pad_id=0, device=device)
    B, T = input_ids.shape[0], input_ids.shape[1] - 1
    old_logprobs = torch.zeros(B, T, device=device)
    for b, (prompt, logprobs) in enumerate(zip(rollouts.prompts, rollouts.old_logprobs)):
        # the first completion id is the target of the last prompt position
        old_logprobs[b, len(prompt) - 1:len(prompt) - 1 + len(logprobs)] = logprobs.to(device)
    before = target_mask(segment_ids, BEFORE_MARKER)
    advantages = torch.where(before, rollouts.advantage_before.to(device)[:, None],
                             rollouts.advantage_after.to(device)[:, None])  # (B, T)
    mask = target_mask(segment_ids, COMPLETION)
    return input_ids, segment_ids, old_logprobs, advantages, mask


def grpo_loss(model, ref_model, rollouts: Rollouts, cfg: GRPOConfig):
    """Mean GRPO loss over all completion tokens of the rollouts; returns (loss, stats)."""
    device = model.lm_head.weight.device
    input_ids, _, old_logprobs, advantages, mask = completion_tensors(rollouts, device)
    targets = input_ids[:, 1:]
    # one log-softmax over the vocabulary serves both the loss and the entropy statistic
    distribution = sampling_logprobs(model(input_ids)[:, :-1], cfg.temperature)  # (B, T, V)
    logprobs = distribution.gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
    ref_logprobs = None
    if ref_model is not None and cfg.kl_coef > 0:
        with torch.no_grad():
            ref_logprobs = token_logprobs(ref_model(input_ids)[:, :-1], targets, cfg.temperature)
    token_loss, token_stats = grpo_token_loss(logprobs, old_logprobs, ref_logprobs, advantages, mask,
                                              cfg.clip_eps, cfg.kl_coef)
    n_tokens = mask.sum().clamp(min=1)
    loss = token_loss.sum() / n_tokens
    with torch.no_grad():
        token_stats["entropy"] = distribution_entropy(distribution[mask]).sum()
    stats = {f"grpo_{k}": (v / n_tokens).item() for k, v in token_stats.items()}
    stats["grpo_loss"] = loss.item()
    stats["grpo_tokens"] = int(mask.sum())
    return loss, stats


def rollout_stats(rollouts: Rollouts, group_size: int) -> dict:
    """Mean reward per rule, completion length and the share of groups with no signal."""
    scores = rollouts.scores
    n = len(scores)
    totals = torch.tensor([s.rl for s in scores]).view(-1, group_size)
    return {
        "reward": totals.mean().item(),
        "reward_accuracy": sum(s.accuracy for s in scores) / n,
        "reward_format": sum(s.format for s in scores) / n,
        "reward_consistency": sum(s.consistency for s in scores) / n,
        "groups_all_equal": (totals == totals[:, :1]).all(-1).float().mean().item(),
        "completion_length": sum(len(c) for c in rollouts.completions) / n,
        "truncated": sum(not s for s in rollouts.stopped) / n,
    }

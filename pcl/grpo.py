"""GRPO with the white-box rewards: rollouts, group advantages and the policy loss.

Rollouts sample through the post-completion part to EOS (training-time generation does not stop at
the marker), so the self-evaluation and the predicted reward are sampled and paid by the
consistency reward.

Fei et al. (2025) give every completion token the advantage of the total reward, as is the default
here. The option split_advantage departs from that: tokens up to the marker get the advantage of
the answer's rewards (every reward function but consistency) and tokens after it the advantage of
the consistency reward.

One step: collect_rollouts samples and scores G completions per prompt, and micro_batches cuts them
into padded tensors. Each of cfg.inner_steps optimizer updates then calls grpo_backward. It counts
the step's loss normaliser over all micro-batches first, then runs forward and backward on each.

Shapes: N prompts, G samples per prompt (the group), B = N * G rows, T target positions.
"""

import math
from contextlib import nullcontext
from collections.abc import Callable, Sequence as SequenceOf
from dataclasses import dataclass, field

import torch

from data import Row, format_prompt
from model.generate import generate, sampling_logprobs
from model.tokenizer import Tokenizer
from pcl import rewards
from pcl.losses import aggregate, clipped_policy_loss, distribution_entropy, kl_penalty, loss_normaliser
from pcl.sequence import COMPLETION, Segment, Sequence, collate, prompt_ids, rollout_sequence, target_mask

BEFORE_MARKER = (Segment.REASONING, Segment.MARKER)

# A reward function scores a batch: (decoded completions, their rows) -> one value per completion,
# or None for "no reward" (left out of its group's statistics, advantage 0).
RewardFn = Callable[[list[str], list[Row]], SequenceOf[float | None]]


@dataclass
class GRPOConfig:
    group_size: int = 8  # G
    prompts_per_step: int = 8  # N
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    clip_low: float = 0.2  # ratio clipped below at 1 - clip_low
    clip_high: float = 0.2  # and above at 1 + clip_high
    kl_coef: float = 0.04
    kl_estimator: str = "k3"  # of KL(policy || reference); see pcl.losses.kl_penalty
    kl_on_flat_groups: bool = True  # groups with all-equal rewards still get the KL gradient
    inner_steps: int = 1  # optimizer updates per batch of rollouts
    micro_batch_size: int = 0  # rows per forward pass; 0: all rows at once
    scale_rewards: bool = True  # divide advantages by the group's reward standard deviation
    loss_agg: str = "token-mean"  # see pcl.losses.LOSS_AGGREGATIONS
    mask_truncated: bool = False  # drop completions cut by max_new_tokens from the loss
    split_advantage: bool = False
    compile_decode: bool = False  # sample through model.generate's compiled decode step


@dataclass
class Rollouts:
    rows: list[Row]  # (B,) the row each sample answers
    prompts: list[list[int]]  # (B,)
    completions: list[list[int]]  # (B,) sampled ids, through EOS when the row stopped
    texts: list[str]  # (B,) decoded completions, tags kept, EOS text removed
    sequences: list[Sequence]  # (B,) prompt + completion with segment ids
    sampler_logprobs: list[torch.Tensor]  # (B,) sampler log-probs of each completion id
    stopped: list[bool]  # (B,) False: cut by max_new_tokens (truncated)
    rewards: dict[str, torch.Tensor]  # name -> (B,) value of each reward function, NaN for no reward
    total: torch.Tensor  # (B,) weighted sum of the rewards, NaN where any is missing
    predicted: list[float | None]  # (B,) parsed reward prediction, None when unparseable
    flat: torch.Tensor  # (B,) bool, the row's group has all-equal rewards (no signal)
    advantage_before: torch.Tensor  # (B,) advantage of ids up to the marker
    advantage_after: torch.Tensor  # (B,) advantage of ids after the marker


def white_box_reward_fns(task: str, weights: rewards.RewardWeights,
                         consistency: bool = True) -> dict[str, tuple[RewardFn, float]]:
    """Return the PCL reward functions and their weights: name -> (function, weight). Add entries
    to try another reward. "consistency" is the one that pays the part after the marker; without
    `consistency`, as for the baselines without post-completion, only accuracy and format pay."""

    def rule(name):
        def fn(texts, rows):
            return [getattr(rewards.score(task, text, row.answer, weights, row.options), name)
                    for text, row in zip(texts, rows)]
        fn.__name__ = f"{name}_reward"
        return fn

    fns = {"accuracy": (rule("accuracy"), weights.accuracy), "format": (rule("format"), weights.format)}
    if consistency:
        fns["consistency"] = (rule("consistency"), weights.consistency)
    return fns


def compute_rewards(fns: dict[str, tuple[RewardFn, float]], texts: list[str], rows: list[Row]) -> dict[str, torch.Tensor]:
    """Run every reward function on the batch: name -> (B,) float tensor, NaN for "no reward"."""
    out = {}
    for name, (fn, _) in fns.items():
        values = list(fn(texts, rows))
        if len(values) != len(texts):
            raise ValueError(f"reward function {name!r} ({getattr(fn, '__name__', fn)}) returned {len(values)} "
                             f"values for {len(texts)} completions; it must return one per completion")
        for v in values:
            if v is not None and not isinstance(v, (int, float)):
                raise ValueError(f"reward function {name!r} returned {v!r}; expected a number or None")
        out[name] = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
    return out


def weighted_total(values: dict[str, torch.Tensor], fns: dict[str, tuple[RewardFn, float]], names) -> torch.Tensor:
    """(B,) sum of weight * value over `names`; NaN where any of them has no reward."""
    total = torch.zeros_like(next(iter(values.values())))
    for name in names:
        total = total + fns[name][1] * values[name]
    return total


def group_advantages(rewards_: torch.Tensor, scale: bool, eps: float = 1e-4) -> torch.Tensor:
    """(N, G) rewards, NaN for "no reward" -> (N, G) advantages r - mean(group), divided by the
    group's std when `scale`. Statistics use only the group's valid rewards.

    A missing reward gets advantage 0, and so does every row of a group with fewer than two valid
    rewards or with all valid rewards equal: such a group carries no signal.
    """
    valid = torch.isfinite(rewards_)
    count = valid.sum(-1, keepdim=True)
    values = torch.where(valid, rewards_, torch.zeros_like(rewards_))
    mean = values.sum(-1, keepdim=True) / count.clamp(min=1)
    centered = torch.where(valid, values - mean, torch.zeros_like(values))
    if scale:
        std = (centered.square().sum(-1, keepdim=True) / count.clamp(min=1)).sqrt()
        centered = centered / (std + eps)
    return torch.where(valid & ~flat_groups(rewards_)[:, None], centered, torch.zeros_like(centered))


def flat_groups(rewards_: torch.Tensor) -> torch.Tensor:
    """(N, G) -> (N,) bool: the group has fewer than two valid rewards, or all of them are equal."""
    valid = torch.isfinite(rewards_)
    high = torch.where(valid, rewards_, torch.full_like(rewards_, -math.inf)).amax(-1)
    low = torch.where(valid, rewards_, torch.full_like(rewards_, math.inf)).amin(-1)
    return (valid.sum(-1) < 2) | (high == low)


@torch.no_grad()
def collect_rollouts(model, tok: Tokenizer, task: str, rows: list[Row], cfg: GRPOConfig,
                     weights: rewards.RewardWeights, generator: torch.Generator | None = None,
                     reward_fns: dict[str, tuple[RewardFn, float]] | None = None,
                     row_keys: list[int] | None = None) -> Rollouts:
    """Sample G completions per row to EOS, score them and compute their advantages.

    The sampled ids are kept as they are: training never re-encodes the decoded text. `row_keys`
    (one per sample, see model.generate.row_key) replaces `generator` as the source of randomness.
    """
    G = cfg.group_size
    fns = reward_fns or white_box_reward_fns(task, weights)
    prompts = [prompt_ids(tok, format_prompt(task, row)) for row in rows]
    was_training = model.training
    model.eval()
    out = generate(model, prompts, cfg.max_new_tokens, stop_ids=[tok.eos_id], pad_id=tok.pad_id,
                   num_samples=G, temperature=cfg.temperature, top_p=cfg.top_p, generator=generator,
                   row_keys=row_keys, compile=cfg.compile_decode)
    model.train(was_training)

    rows_b = [row for row in rows for _ in range(G)]
    prompts_b = [p for p in prompts for _ in range(G)]
    texts = [tok.decode_completion(ids) for ids in out.tokens]
    values = compute_rewards(fns, texts, rows_b)
    total = weighted_total(values, fns, fns)
    predicted = [rewards.parse_predicted_reward(rewards.split_completion(t)[1], weights) for t in texts]
    sequences = [rollout_sequence(tok, p, ids, s) for p, ids, s in zip(prompts_b, out.tokens, out.stopped)]

    def advantages(r):
        return group_advantages(r.view(-1, G), cfg.scale_rewards).view(-1)

    if cfg.split_advantage:
        answer = [name for name in fns if name != "consistency"]
        before = advantages(weighted_total(values, fns, answer))
        after = advantages(weighted_total(values, fns, ["consistency"]) if "consistency" in fns
                           else torch.zeros_like(total))
    else:
        before = after = advantages(total)
    flat = flat_groups(total.view(-1, G)).repeat_interleave(G)
    return Rollouts(rows_b, prompts_b, out.tokens, texts, sequences, out.logprobs, out.stopped, values, total,
                    predicted, flat, before, after)


@dataclass
class MicroBatch:
    """One forward pass worth of rollouts as (B, T+1) ids and (B, T) target-aligned tensors."""

    input_ids: torch.Tensor  # (B, T+1)
    mask: torch.Tensor  # (B, T) bool, the targets that enter the loss
    kl_mask: torch.Tensor  # (B, T) bool, the targets that get the KL term
    advantages: torch.Tensor  # (B, T)
    sampler_logprobs: torch.Tensor  # (B, T), 0 outside the completion
    old_logprobs: torch.Tensor | None = None  # filled by the first inner step
    ref_logprobs: torch.Tensor | None = None  # filled by the first inner step
    stats: dict = field(default_factory=dict)


def micro_batches(rollouts: Rollouts, cfg: GRPOConfig, device) -> list[MicroBatch]:
    """Cut the rollouts into micro-batches of cfg.micro_batch_size rows, each padded to its own
    longest row. Masks come from segment ids and the truncation flags, never from token values."""
    B = len(rollouts.sequences)
    size = cfg.micro_batch_size or B
    batches = []
    for start in range(0, B, size):
        index = range(start, min(start + size, B))
        input_ids, segment_ids = collate([rollouts.sequences[i] for i in index], pad_id=0, device=device)
        T = input_ids.shape[1] - 1
        sampler = torch.zeros(len(index), T, device=device)
        for b, i in enumerate(index):
            # the first completion id is the target of the last prompt position
            p, lp = len(rollouts.prompts[i]), rollouts.sampler_logprobs[i]
            sampler[b, p - 1:p - 1 + len(lp)] = lp.to(device)
        keep = torch.tensor([rollouts.stopped[i] or not cfg.mask_truncated for i in index], device=device)
        mask = target_mask(segment_ids, COMPLETION) & keep[:, None]
        with_kl = torch.tensor([cfg.kl_on_flat_groups or not bool(rollouts.flat[i]) for i in index], device=device)
        before = target_mask(segment_ids, BEFORE_MARKER)
        advantages = torch.where(before, rollouts.advantage_before[list(index)].to(device)[:, None],
                                 rollouts.advantage_after[list(index)].to(device)[:, None])
        batches.append(MicroBatch(input_ids, mask, mask & with_kl[:, None], advantages, sampler))
    return batches


def grpo_backward(model, ref_model, batches: list[MicroBatch], cfg: GRPOConfig, scale: float = 1.0,
                  autocast=None, reduce: Callable[[list[float]], list[float]] | None = None) -> dict:
    """Run forward and backward of the GRPO loss over all micro-batches of one optimizer update; the
    gradients accumulate in the parameters. Returns the step's statistics.

    The normaliser is counted over every micro-batch before the first backward pass. On the first
    inner step the old log-probs are the detached training log-probs, so the importance ratio is
    exactly 1; later inner steps reuse them. `scale` multiplies the loss (1 unless combined), and
    `autocast`, a context manager, wraps the forward passes but not the backward ones.

    In data-parallel training each process has a part of the step's rows, and `reduce` sums a
    list of numbers over the processes. It makes the normaliser and the returned statistics those of
    the whole step, so the per-process losses add up to the single-process loss.
    """
    reduce = reduce or list
    normaliser = reduce([loss_normaliser([b.mask for b in batches], cfg.loss_agg, cfg.max_new_tokens)])[0]
    use_kl = ref_model is not None and cfg.kl_coef > 0
    sums = dict.fromkeys(["loss", "policy_loss", "kl", "clip_low", "clip_high", "entropy", "ratio",
                          "sampler_logprob_error"], 0.0)
    for b in batches:
        with autocast or nullcontext():
            targets = b.input_ids[:, 1:]
            distribution = sampling_logprobs(model(b.input_ids)[:, :-1], cfg.temperature)  # (B, T, V)
            logprobs = distribution.gather(-1, targets[..., None]).squeeze(-1)  # (B, T)
            if b.old_logprobs is None:
                b.old_logprobs = logprobs.detach()
                with torch.no_grad():
                    # how far the sampler's log-probs are from the training forward's (cache, kernels)
                    error = torch.where(b.mask, (b.sampler_logprobs - logprobs).abs(), torch.zeros_like(logprobs))
                    sums["sampler_logprob_error"] += error.sum().item()
            if use_kl and b.ref_logprobs is None:
                with torch.no_grad():
                    b.ref_logprobs = sampling_logprobs(ref_model(b.input_ids)[:, :-1], cfg.temperature).gather(
                        -1, targets[..., None]).squeeze(-1)
            policy, ratio, clipped_low, clipped_high = clipped_policy_loss(
                logprobs, b.old_logprobs, b.advantages, b.mask, cfg.clip_low, cfg.clip_high)
            per_token = policy
            if use_kl:
                # over every loss token for the log, and only over kl_mask (a subset) for the gradient
                kl = kl_penalty(logprobs, b.ref_logprobs, b.mask, cfg.kl_estimator)
                per_token = per_token + cfg.kl_coef * torch.where(b.kl_mask, kl, torch.zeros_like(kl))
            loss = aggregate(per_token, b.mask, cfg.loss_agg, normaliser)

        (scale * loss).backward()

        with torch.no_grad():
            zeros = torch.zeros_like(logprobs)
            sums["loss"] += loss.item()
            sums["policy_loss"] += aggregate(policy, b.mask, cfg.loss_agg, normaliser).item()
            if use_kl:
                sums["kl"] += kl.sum().item()
            sums["clip_low"] += clipped_low.sum().item()
            sums["clip_high"] += clipped_high.sum().item()
            sums["ratio"] += torch.where(b.mask, ratio, zeros).sum().item()
            sums["entropy"] += distribution_entropy(distribution[b.mask]).sum().item()
    names = list(sums)
    *totals, tokens = reduce([sums[k] for k in names] + [sum(int(b.mask.sum()) for b in batches)])
    sums, tokens = dict(zip(names, totals)), int(tokens)
    stats = {f"grpo_{k}": v if k in ("loss", "policy_loss") else v / max(tokens, 1) for k, v in sums.items()}
    stats["grpo_tokens"] = tokens
    return stats


def rollout_stats(rollouts: Rollouts, group_size: int, mask_truncated: bool = False) -> dict:
    """Per-step statistics of the rollouts: each reward function's mean and std, the share of
    unparseable reward predictions (when a consistency reward is among the rewards) and of groups
    with no signal, and completion lengths.

    Rewards are averaged over the samples that have one. Lengths are over the samples that enter
    the loss: all of them, or the non-truncated ones under truncation masking.
    """
    n = len(rollouts.completions)
    stats = {}
    for name, values in rollouts.rewards.items():
        valid = values[torch.isfinite(values)]
        stats[f"reward_{name}"] = valid.mean().item() if len(valid) else math.nan
        stats[f"reward_{name}_std"] = valid.std(unbiased=False).item() if len(valid) else math.nan
    total = rollouts.total[torch.isfinite(rollouts.total)]
    stats["reward"] = total.mean().item() if len(total) else math.nan
    stats["reward_std"] = total.std(unbiased=False).item() if len(total) else math.nan
    stats["reward_missing"] = 1 - len(total) / n
    if "consistency" in rollouts.rewards:  # only then do completions predict their reward
        stats["reward_unparseable"] = sum(p is None for p in rollouts.predicted) / n
    stats["groups_all_equal"] = rollouts.flat.view(-1, group_size)[:, 0].float().mean().item()
    kept = [len(c) for c, s in zip(rollouts.completions, rollouts.stopped) if s or not mask_truncated]
    stats["completion_length"] = sum(kept) / len(kept) if kept else 0.0
    stats["completion_length_min"] = min(kept, default=0)
    stats["completion_length_max"] = max(kept, default=0)
    stats["truncated"] = sum(not s for s in rollouts.stopped) / n
    return stats

"""Batched sampling with a preallocated KV cache.

Each prompt is prefilled once and its cache is shared by its `num_samples` rows (the G samples of
a GRPO group). Rows that hit a stop id leave the batch, so finished rows stop costing compute.
"""

from dataclasses import dataclass

import torch

from model.transformer import KVCache, Transformer


@dataclass
class Generation:
    tokens: list[list[int]]  # per row: generated ids, ending with the stop id when one was hit
    logprobs: list[torch.Tensor]  # per row: (len,) fp32 log-probability of each generated id
    stopped: list[bool]  # per row: True if a stop id ended it, False if max_new_tokens did (truncated)


def sampling_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probabilities (..., V) in fp32 of the distribution that sampling draws from before top-p.

    Training recomputes log-probs with this same function, so the sampler's log-probs and the
    training forward's agree and the first GRPO importance ratio is 1. Temperature 0 (greedy) uses
    the unscaled distribution.
    """
    logits = logits.float()
    if temperature > 0 and temperature != 1:  # dividing by 1 is exact, so it is skipped
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1)


def sample_next(logprobs: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """Draw one id per row from (N, V) log-probs: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logprobs.argmax(-1)
    probs = logprobs.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # drop a token once the tokens ranked above it already cover top_p of the mass
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return sample_categorical(probs, generator)


def sample_categorical(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """Draw one id per row from unnormalised probabilities (N, V) by inverting the cumulative sum.

    This draws one uniform number per row, where torch.multinomial draws V exponential numbers per
    row; at V in the thousands, generating those numbers took a fifth of a rollout's time on CPU.
    """
    cumulative = probs.cumsum(-1)  # (N, V), non-decreasing
    total = cumulative[:, -1:]  # (N, 1)
    uniform = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    ids = torch.searchsorted(cumulative, uniform * total, right=True).squeeze(-1)  # first id above the draw
    overflow = ids == probs.shape[-1]
    if overflow.any():
        # rounding put the draw at the total mass: take the first id that reaches the total, which
        # has positive probability
        ids = torch.where(overflow, cumulative.argmax(-1), ids)
    return ids


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids,
             pad_id: int, num_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             generator: torch.Generator | None = None) -> Generation:
    """Sample continuations of `prompts`; row i * num_samples + j is sample j of prompt i.

    stop_ids: ids that end every row, or one list of ids per output row.
    """
    device = model.lm_head.weight.device
    N, G = len(prompts), num_samples
    rows = N * G
    if not stop_ids or isinstance(stop_ids[0], int):
        stop_ids = [list(stop_ids)] * rows
    if len(stop_ids) != rows:
        raise ValueError(f"stop_ids has {len(stop_ids)} lists, expected one per output row ({rows})")
    embedding_rows = model.model.embed_tokens.weight.shape[0]
    largest_id = max([pad_id] + [max(p) for p in prompts if p])
    if largest_id >= embedding_rows:
        raise ValueError(f"token id {largest_id} in the prompts or pad_id is out of range for the embedding "
                         f"matrix ({embedding_rows} rows); resize the model's embeddings to fit the tokenizer")
    width = max(1, max(len(s) for s in stop_ids))
    stops = torch.tensor([list(s) + [-1] * (width - len(s)) for s in stop_ids], device=device)  # (rows, S)

    # left-pad the prompts so that they end at the same position
    P = max(len(p) for p in prompts)
    ids = torch.full((N, P), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((N, P), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, device=device)
        mask[i, P - len(p):] = 1

    dtype = model.lm_head.weight.dtype
    cache = KVCache(model.config, N, P + max_new_tokens, device, dtype)
    logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (N, V)
    share = torch.arange(N, device=device).repeat_interleave(G)
    cache.select_rows(share)
    logits, mask = logits[share], mask[share]  # (rows, V), (rows, P)

    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, max_new_tokens), device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    active = torch.arange(rows, device=device)  # output rows still generating, in cache order
    for step in range(max_new_tokens):
        step_logprobs = sampling_logprobs(logits, temperature)  # (A, V)
        next_ids = sample_next(step_logprobs, temperature, top_p, generator)  # (A,)
        tokens[active, step] = next_ids
        logprobs[active, step] = step_logprobs.gather(-1, next_ids[:, None]).squeeze(-1)
        lengths[active] += 1
        hit_stop = (stops[active] == next_ids[:, None]).any(-1)
        stopped[active] |= hit_stop
        if step == max_new_tokens - 1 or hit_stop.all():
            break
        if hit_stop.any():
            keep = (~hit_stop).nonzero().squeeze(-1)
            active, next_ids, mask = active[keep], next_ids[keep], mask[keep]
            cache.select_rows(keep)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        logits = model(next_ids[:, None], attention_mask=mask, cache=cache)[:, -1]

    lengths, stopped = lengths.tolist(), stopped.tolist()
    return Generation(
        tokens=[tokens[r, :lengths[r]].tolist() for r in range(rows)],
        logprobs=[logprobs[r, :lengths[r]].cpu() for r in range(rows)],
        stopped=stopped,
    )

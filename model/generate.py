"""Batched sampling with a preallocated KV cache.

Each prompt is prefilled once and its cache is shared by its `num_samples` rows (the G samples of
a GRPO group). Rows that hit a stop id leave the batch, so finished rows stop costing compute.

Randomness comes either from a torch.Generator, whose draws depend on which rows share the batch,
or from one integer key per output row (`row_keys`). With keys, the uniform number behind each
draw is a hash of (key, position), so a row samples the same ids whichever rows share its batch.
The trainer uses keys, which lets several processes that each sample a part of a batch
reproduce one process that samples all of it.

With compile=True, each decode step (one new id per row through the model, and the draw of the
next id) runs through torch.compile(dynamic=True) over a StaticKVCache. The step reads the cache,
and this loop writes the step's keys and values. The numbers of rows and of cached positions are
symbolic, so the step compiles only a few times per process (once in bench/generate_speed.py).
Without nucleus truncation the step draws with sample_blocked, which picks the ids of
sample_categorical with fewer passes over the vocabulary. Its logits equal the eager step's up to
rounding, so a sampled id can differ from the eager path's where a uniform number falls within
rounding of a boundary of the cumulative distribution. In bfloat16 that rounding is coarse, and
even greedy ids differed from the eager path's on a random model.
"""

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.compiled import MaybeCompiled, mark_sizes_dynamic
from model.transformer import KVCache, StaticKVCache, Transformer


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
    return torch.log_softmax(scaled_logits(logits, temperature), dim=-1)


def scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return the logits in fp32, divided by the temperature unless it is 0 (greedy) or 1."""
    logits = logits.float()
    if temperature > 0 and temperature != 1:  # dividing by 1 is exact, so it is skipped
        logits = logits / temperature
    return logits


_MASK32 = 0xFFFFFFFF


def row_key(*parts: int | str) -> int:
    """Return a 32-bit sampling key for one output row from values that name it, such as
    (seed, purpose, step, prompt index, sample index)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """Hash int64 values holding 32-bit integers to 32-bit integers with xorshift-multiply rounds.
    A product wraps modulo 2^64 in int64, and masking keeps its low 32 bits, which are the 32-bit
    product."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def keyed_uniforms(keys: torch.Tensor, position: int) -> torch.Tensor:
    """(A,) int64 row keys -> (A,) float64 uniform numbers in [0, 1) with 52 random bits, a pure
    function of (key, position)."""
    high = _mix32(keys ^ _mix32(torch.full_like(keys, 2 * position)))
    low = _mix32(keys ^ _mix32(torch.full_like(keys, 2 * position + 1)))
    return ((high << 20) | (low >> 12)).double() / 2.0 ** 52


def sample_next(logprobs: torch.Tensor, temperature: float, top_p: float, generator=None,
                uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one id per row from (N, V) log-probs: greedy at temperature 0, else nucleus sampling.

    Row i takes the id where the cumulative probability passes uniforms[i] ((N,) numbers in
    [0, 1); inverse-CDF sampling), so its draw uses no other row's numbers. Without `uniforms`,
    they are drawn from `generator`.
    """
    if temperature == 0:
        return logprobs.argmax(-1)
    probs = logprobs.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # drop a token once the tokens ranked above it already cover top_p of the mass
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if uniforms is None:
        uniforms = torch.rand(probs.shape[0], generator=generator, device=probs.device, dtype=torch.float64)
    return sample_categorical(probs, uniforms)


def sample_categorical(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one id per row from unnormalised probabilities (N, V), given one uniform number in
    [0, 1) per row (N,), by inverting the cumulative sum in float64.

    Row i takes the first id whose cumulative probability exceeds uniforms[i] times the row's
    total. torch.multinomial instead draws V exponential numbers per row, which at V in the
    thousands took a fifth of a rollout's time on CPU.
    """
    cumulative = probs.double().cumsum(-1)  # (N, V), non-decreasing
    total = cumulative[:, -1:]  # (N, 1)
    threshold = uniforms.to(cumulative.device)[:, None] * total  # (N, 1)
    # A uniform number within rounding of 1 can put the threshold at the total. Below the total by
    # one rounding step, it selects the first id that reaches the total, which has a probability
    # above 0. (Keyed uniforms stay below 1 - 2^-52 and never need this.) The clamp has no branch,
    # so the compiled decode step runs it inside its graph.
    threshold = torch.minimum(threshold, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cumulative, threshold, right=True).squeeze(-1)  # (N,)
    # a row whose total is 0 or NaN (from a diverged model) gets id 0 instead of the out-of-range V
    return torch.where(total.squeeze(-1) > 0, ids, 0)


def sample_with_logprobs(logits: torch.Tensor, temperature: float, top_p: float,
                         uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one id per row from logits (N, V) with sample_next, given uniform numbers (N,) or None
    when greedy. Returns the ids (N,) and their fp32 log-probabilities (N,) under sampling_logprobs."""
    logprobs = sampling_logprobs(logits, temperature)
    ids = sample_next(logprobs, temperature, top_p, uniforms=uniforms)
    return ids, logprobs.gather(-1, ids[:, None]).squeeze(-1)


def sample_blocked(logits: torch.Tensor, temperature: float,
                   uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one id per row from logits (N, V) as sample_with_logprobs does at temperature > 0 and
    top_p = 1, in fewer passes over the vocabulary. Returns the ids (N,) and their fp32
    log-probabilities (N,).

    The vocabulary is cut into blocks of about sqrt(V) ids. One pass exponentiates the logits and
    sums each block in float64. The cumulative sum over the blocks then finds the block where the
    threshold falls, and a cumulative sum inside that block finds the id. sample_categorical
    instead writes log-probabilities, probabilities and their float64 cumulative sum over all V.
    The ids are the same unless a threshold falls within rounding of a boundary: the two
    exponentiate differently rounded fp32 values (log-probabilities against logits minus their
    maximum) and sum them in another order. One id in 200,000 draws at V = 2048 differed in a
    check with random logits; tests/test_generate.py compares both.
    """
    x = scaled_logits(logits, temperature)
    N, V = x.shape
    block = 1 << max(4, round(V.bit_length() / 2))  # a power of two near sqrt(V)
    if V % block:
        x = F.pad(x, (0, -V % block), value=float("-inf"))  # ids past V get probability 0
    top = x.amax(-1, keepdim=True)  # (N, 1)
    blocks = x.view(N, -1, block)  # (N, B, C)
    cumulative = (blocks - top[:, :, None]).exp().double().sum(-1).cumsum(-1)  # (N, B)
    total = cumulative[:, -1:]  # (N, 1)
    threshold = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    # the first block whose cumulative sum passes the threshold (the clamp only acts on a NaN total)
    b = torch.searchsorted(cumulative, threshold, right=True).clamp(max=cumulative.shape[-1] - 1)  # (N, 1)
    before = torch.where(b > 0, cumulative.gather(-1, (b - 1).clamp(min=0)), 0.0)  # (N, 1)
    probs = (blocks.gather(1, b[:, :, None].expand(N, 1, block)).squeeze(1) - top).exp()  # (N, C)
    inside = before + probs.double().cumsum(-1)  # (N, C), non-decreasing
    passed = (inside > threshold) & (probs > 0)
    # Rounding can leave no id of the block past the threshold. The row then takes the first id with
    # probability above 0 at which the block's cumulative sum reaches its end, as sample_categorical
    # takes the first id that reaches the total.
    reached = (inside >= inside[:, -1:]) & (probs > 0)
    offset = torch.where(passed.any(-1), passed.int().argmax(-1), reached.int().argmax(-1))  # (N,)
    ids = torch.where(total.squeeze(-1) > 0, b.squeeze(-1) * block + offset, 0)  # 0 as in sample_categorical
    logprobs = x.gather(-1, ids[:, None]).squeeze(-1) - top.squeeze(-1) - total.squeeze(-1).log().float()
    return ids, logprobs


def _decode_step(model: Transformer, ids, positions, rotary, cache: StaticKVCache, uniforms, temperature: float,
                 top_p: float):
    """Run one new id per row (ids (A, 1)) at its position (positions (A, 1)) through the model over
    `cache`, and sample each row's next id as sample_with_logprobs does. Returns the next ids (A,),
    their log-probs (A,), and the step's keys and values (L, A, K, 1, Dh).

    rotary is the pair of cos and sin tables (T, Dh) for every position of the call, which the
    caller computes once, and the step gathers its rows' entries. When the step computed them,
    inductor inlined sin and cos into the kernels that read the rotated queries and keys, and
    computed them again for every element those kernels read."""
    cos, sin = (table[positions][:, None] for table in rotary)  # (A, 1, 1, Dh)
    logits = model.forward_masked(ids, cos, sin, None, cache)[:, -1]
    if uniforms is not None and top_p >= 1:  # sampling at temperature > 0 without nucleus truncation
        next_ids, next_logprobs = sample_blocked(logits, temperature, uniforms)
    else:
        next_ids, next_logprobs = sample_with_logprobs(logits, temperature, top_p, uniforms)
    return next_ids, next_logprobs, torch.stack(cache.new_keys), torch.stack(cache.new_values)


def _mark_sizes_symbolic(ids, positions, rotary, uniforms, step: StaticKVCache, buffers: KVCache):
    """Give each size of the decode step's inputs that varies between steps or calls a
    torch.compile symbol of its own: rows A, prompts N, prompt length P, cached positions S, the
    length of the buffers that `step` views, and the length of the rotary tables. Sizes below 2
    stay unmarked, because torch.compile always specialises 0 and 1.

    Unmarked, torch.compile gives sizes that are equal at the first call one symbol and guards on
    their equality, so the step compiled again when they parted. This happened to the S of 2 at the
    first step against 2 key/value heads, and to N against A with one sample per prompt. A new
    max_new_tokens changed the buffers' strides and compiled the step again too.
    """
    marks = [(ids, 0), (positions, 0), (rotary[0], 0), (rotary[1], 0), (step.rows, 0), (step.prompt_bias, 0),
             (step.prompt_bias, 1)]
    if uniforms is not None:
        marks.append((uniforms, 0))
    for tensor in (step.prompt_keys, step.prompt_values, step.keys, step.values, buffers.keys, buffers.values):
        marks += [(tensor, 1), (tensor, 3)]  # (L, N or A, K, P or S, Dh)
    mark_sizes_dynamic(marks)


# With cpp_wrapper the graph's kernels are called from C++ rather than from Python.
# NOTE: timed and tested on CPU only. On CUDA, this option and the size marks have not been run.
_decode_step_compiled = MaybeCompiled(_decode_step, cpp_wrapper=True)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_ids,
             pad_id: int, num_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             generator: torch.Generator | None = None, row_keys: list[int] | None = None,
             compile: bool = False) -> Generation:
    """Sample continuations of `prompts`; row i * num_samples + j is sample j of prompt i.

    stop_ids: ids that end every row, or one list of ids per output row.
    row_keys: one sampling key per output row (see row_key); when given, `generator` is unused.
    compile: run the decode steps through torch.compile (see the module's docstring).
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
    if row_keys is not None and len(row_keys) != rows:
        raise ValueError(f"row_keys has {len(row_keys)} keys, expected one per output row ({rows})")
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
    cache = KVCache(model.config, N, P + (0 if compile else max_new_tokens), device, dtype)
    logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]  # (N, V)
    share = torch.arange(N, device=device).repeat_interleave(G)
    if compile:
        # the G rows of a prompt share its prompt cache, and `cache` now stores each row's generated positions
        prompt_keys, prompt_values = cache.keys, cache.values
        prompt_bias = torch.zeros(N, P, device=device).masked_fill(mask == 0, float("-inf"))  # (N, P)
        prompt_lengths = mask.sum(-1)  # (N,): the position of the first generated token
        cache = KVCache(model.config, rows, max_new_tokens + StaticKVCache.spare, device, dtype)
        cos, sin = model.rotary_tables(torch.arange(P + max_new_tokens, device=device)[None], dtype)
        rotary = cos[0, 0], sin[0, 0]  # (P + max_new_tokens, Dh) each: every position a row can reach
    else:
        cache.select_rows(share)
    logits, mask = logits[share], mask[share]  # (rows, V), (rows, P)

    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, max_new_tokens), device=device)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    stopped = torch.zeros(rows, dtype=torch.bool, device=device)
    active = torch.arange(rows, device=device)  # output rows still generating, in cache order
    keys = None if row_keys is None else torch.tensor(row_keys, dtype=torch.long, device=device)  # (rows,)

    def uniforms(step):  # (A,) float64 numbers that draw the active rows' ids at `step`, or None when greedy
        if temperature == 0:
            return None
        if keys is not None:
            return keyed_uniforms(keys[active], step)
        return torch.rand(len(active), generator=generator, device=device, dtype=torch.float64)

    next_ids, next_logprobs = sample_with_logprobs(logits, temperature, top_p, uniforms(0))  # (A,), (A,)
    for step in range(max_new_tokens):
        tokens[active, step] = next_ids
        logprobs[active, step] = next_logprobs
        lengths[active] += 1
        hit_stop = (stops[active] == next_ids[:, None]).any(-1)
        stopped[active] |= hit_stop
        if step == max_new_tokens - 1 or hit_stop.all():
            break
        if hit_stop.any():
            keep = (~hit_stop).nonzero().squeeze(-1)
            active, next_ids, mask = active[keep], next_ids[keep], mask[keep]
            cache.select_rows(keep)
        step_uniforms = uniforms(step + 1)
        if compile:
            S = step + StaticKVCache.spare
            step_cache = StaticKVCache(prompt_keys, prompt_values, prompt_bias, active, G,
                                       cache.keys[:, :, :, :S], cache.values[:, :, :, :S])
            positions = prompt_lengths[active // G, None] + step  # (A, 1)
            step_ids = next_ids[:, None]
            _mark_sizes_symbolic(step_ids, positions, rotary, step_uniforms, step_cache, cache)
            next_ids, next_logprobs, new_keys, new_values = _decode_step_compiled(
                model, step_ids, positions, rotary, step_cache, step_uniforms, temperature, top_p)
            cache.keys[:, :, :, step:step + 1] = new_keys
            cache.values[:, :, :, step:step + 1] = new_values
        else:
            mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)  # (A, cached + 1)
            logits = model(next_ids[:, None], attention_mask=mask, cache=cache)[:, -1]
            next_ids, next_logprobs = sample_with_logprobs(logits, temperature, top_p, step_uniforms)

    lengths, stopped = lengths.tolist(), stopped.tolist()
    return Generation(
        tokens=[tokens[r, :lengths[r]].tolist() for r in range(rows)],
        logprobs=[logprobs[r, :lengths[r]].cpu() for r in range(rows)],
        stopped=stopped,
    )

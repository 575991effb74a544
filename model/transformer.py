"""Decoder-only transformer of the Llama / Qwen2 / Qwen3 families, in one file.

Module and parameter names follow the Hugging Face checkpoints (`model.layers.0.self_attn.q_proj`,
...), so a state dict loads without a renaming table. Rotary embeddings use the rotate-half layout
that those checkpoints assume.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.compiled import MaybeCompiled, mark_sizes_dynamic
from model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 and cast back before the weight, as the HF implementation does
        x_float = x.float()
        x_float = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_float.to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,), with llama3 scaling applied when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend smoothly in between
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        smooth = (old_context / wavelength - low) / (high - low)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelength > old_context / low, inv_freq / factor, inv_freq)
        is_medium = (wavelength <= old_context / low) & (wavelength >= old_context / high)
        inv_freq = torch.where(is_medium, blended, inv_freq)
    return inv_freq.float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Keys and values of every layer, preallocated once for `max_length` positions.

    All rows share one write position: prompts are left-padded so that they end together, and the
    key padding is carried by the attention mask that the caller passes to each forward.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int, device, dtype):
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, K, Tmax, Dh)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled so far
        self.max_length = max_length

    def update(self, layer: int, k, v):
        """Write k, v (B, K, T, Dh) after the filled positions; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"KV cache overflow: {end} positions needed, {self.max_length} allocated")
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, steps: int):
        self.length += steps

    def select_rows(self, index: torch.Tensor):
        """Keep (and reorder or repeat) batch rows: used to share a prompt's cache among its samples
        and to drop finished rows."""
        self.keys = self.keys.index_select(1, index)
        self.values = self.values.index_select(1, index)


class StaticKVCache:
    """The cache of a decode step (one new position per row) as the compiled step reads it. generate
    makes its sizes torch.compile symbols, so one graph serves steps and calls of other sizes.

    Row a continues prompt rows[a] // group_size, whose keys and values (L, N, K, P, Dh) are stored
    once and shared by the rows that continue it. prompt_bias (N, P) fp32 is 0 at its real tokens and
    -inf at its padding, and is added to the attention scores.
    keys and values (L, A, K, S, Dh) hold the positions each row generated so far, followed by
    `spare` unused positions, so that S never takes the sizes 0 and 1, for which torch.compile
    compiles a graph of their own.

    The step does not write its own keys and values. update() collects them in new_keys and
    new_values, and the caller stores them after the step. (A compiled graph that wrote into its
    input buffers copied each whole buffer at every layer.)
    """

    spare = 2  # unused positions at the end of keys and values

    def __init__(self, prompt_keys, prompt_values, prompt_bias, rows, group_size: int, keys, values):
        self.prompt_keys, self.prompt_values, self.prompt_bias = prompt_keys, prompt_values, prompt_bias
        self.rows, self.group_size = rows, group_size  # rows (A,): each row's index among all N * G rows
        self.keys, self.values = keys, values
        self.new_keys, self.new_values = [], []  # per layer: (A, K, 1, Dh)

    def update(self, layer: int, k, v):
        """Keep k, v (A, K, 1, Dh) for the caller to store."""
        self.new_keys.append(k)
        self.new_values.append(v)


def shared_prompt_attention(q, k, v, cache: StaticKVCache, layer: int):
    """Compute the attention of one new query per row, q (A, H, 1, Dh), over the row's prompt, its
    generated positions and its new key k and value v (A, K, 1, Dh). Returns (A, H, 1, Dh).

    The prompt part multiplies the queries of all rows that continue a prompt with that prompt's
    keys in one product, so the prompt's cache is read once per group rather than once per row.
    Rows that have stopped take part as zeros in the grouped products and are dropped after them.
    """
    A, H, _, Dh = q.shape
    K, G = k.shape[1], cache.group_size
    N, P = cache.prompt_bias.shape
    q = q.reshape(A, K, H // K, Dh)  # heads h = j * (H / K) + g share key/value head j, as in enable_gqa
    scale = Dh ** -0.5

    def grouped(x):  # (A, K, H/K, X) -> (N, K, G * H/K, X): each prompt's rows side by side
        full = x.new_zeros(N * G, *x.shape[1:]).index_copy(0, cache.rows, x)
        return full.view(N, G, K, H // K, -1).transpose(1, 2).reshape(N, K, G * (H // K), -1)

    def ungrouped(x):  # the inverse of grouped, back to the A rows
        x = x.view(N, K, G, H // K, -1).transpose(1, 2).reshape(N * G, K, H // K, -1)
        return x.index_select(0, cache.rows)

    # The padding bias is added per prompt, before the rows are picked out, which saves a gather per layer.
    prompt_scores = torch.matmul(grouped(q), cache.prompt_keys[layer].transpose(-1, -2)).float()  # (N, K, G * H/K, P)
    prompt_scores = ungrouped(prompt_scores + cache.prompt_bias[:, None, None, :])  # (A, K, H/K, P)
    generated_scores = torch.matmul(q, cache.keys[layer].transpose(-1, -2)).float()  # (A, K, H/K, S)
    S = generated_scores.shape[-1]
    unwritten = torch.arange(S, device=q.device) >= S - cache.spare  # (S,)
    generated_scores = generated_scores.masked_fill(unwritten, float("-inf"))
    new_scores = (q * k).sum(-1, keepdim=True).float()  # (A, K, H/K, 1)
    scores = torch.cat([prompt_scores, generated_scores, new_scores], dim=-1) * scale
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    y = ungrouped(torch.matmul(grouped(weights[..., :P]), cache.prompt_values[layer]))
    y = y + torch.matmul(weights[..., P:P + S], cache.values[layer]) + weights[..., -1:] * v
    return y.reshape(A, H, 1, Dh)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        D, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(D, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, D, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, mask, cache: KVCache | StaticKVCache | None, layer: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H or K, T, Dh)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if isinstance(cache, StaticKVCache):
            cache.update(layer, k, v)
            y = shared_prompt_attention(q, k, v, cache, layer)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, S, Dh) with S = cached + T
        if T == 1 and mask is not None:
            y = decode_attention(q, k, v, mask)
        elif mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def decode_attention(q, k, v, mask):
    """Attention of one new query per row: q (B, H, 1, Dh), k and v (B, K, S, Dh), boolean mask
    (B or 1, 1, 1, S); returns (B, H, 1, Dh).

    The H / K query heads that share a key/value head are stacked into one matrix, so a step is two
    batched matrix products over the cache and copies no keys per query head. In a one-off timing
    on the 2-core CPU of BENCHMARKS.md (128 rows, 4 query and 2 key/value heads, 170 cached
    positions), a call took 470 us against 606 us for scaled_dot_product_attention, whose CPU
    kernel is built for long queries; bench/generate_speed.py measures the effect on sampling. The
    softmax runs in fp32; as in transformers' eager attention, bf16 scores are rounded to bf16
    before it.
    """
    B, H, _, Dh = q.shape
    K = k.shape[1]
    q = q.reshape(B, K, H // K, Dh)  # heads h = j * (H / K) + g share key/value head j, as in enable_gqa
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * Dh ** -0.5  # (B, K, H/K, S)
    scores = scores.masked_fill(~mask, float("-inf"))  # mask (B or 1, 1, 1, S) broadcasts over heads
    weights = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(weights, v).reshape(B, H, 1, Dh)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, blocks and final norm: the `model.` prefix of HF checkpoints."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def _layer(layer: Block, x, cos, sin, mask):
    """Run one decoder layer of a forward pass without a cache."""
    return layer(x, cos, sin, mask, None, 0)


def _mark_layer_sizes_dynamic(x, cos, sin, mask):
    """Make the batch size and the lengths of a layer's inputs torch.compile symbols.

    Unmarked, a size that equalled a weight dimension at the first call (a batch of 32 rows in a model
    with 32-wide heads) was compiled in as a constant, and every other batch size compiled again.
    """
    marks = [(x, 0), (x, 1), (cos, 0), (cos, 2), (sin, 0), (sin, 2)]  # x (B, T, D), cos and sin (B, 1, T, Dh)
    if mask is not None:
        marks += [(mask, 0), (mask, 2), (mask, 3)]  # (B or 1, 1, T, S)
    mark_sizes_dynamic(marks)


# One compiled function serves every layer. The layers' parameters are inputs of its graph, so layers
# of the same shape share one compilation.
_layer_compiled = MaybeCompiled(_layer)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)
        # With compile_layers (train.py --compile-layers), forward passes without a KV cache run each
        # decoder layer through torch.compile. Generation always uses a cache, so it never compiles
        # them. The compiled layers fuse the element-wise operations and round differently from eager.
        self.compile_layers = False

    def _apply(self, fn, recurse=True):
        # keep the rope frequencies in fp32 whatever dtype the weights are cast to: a bf16 copy
        # would be off by up to about a radian at position 512
        super()._apply(fn, recurse)
        self.inv_freq = rope_inverse_frequencies(self.config).to(self.inv_freq.device)
        return self

    def init_weights(self, seed: int | None = None):
        """Random initialisation for a model trained from scratch (loaded models skip this)."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("norm.weight") or "layernorm" in name:
                    p.fill_(1.0)
                elif name.endswith("bias"):
                    p.zero_()
                else:
                    std = 0.02
                    if name.endswith(("o_proj.weight", "down_proj.weight")):
                        std /= math.sqrt(2 * self.config.num_hidden_layers)  # residual branches
                    p.copy_(torch.randn(p.shape, generator=generator) * std)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None,
                last_only: bool = False):
        """Logits (B, T, V), or (B, 1, V) with last_only.

        attention_mask (B, S) marks real tokens with 1 over all S = cached + T positions; None means
        every position is real. Without position_ids, positions count from each row's first real
        token, so a left-padded row gets the same positions as the same row unpadded.
        """
        B, T = input_ids.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:start + T]
            else:
                position_ids = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        mask = self._attention_mask(attention_mask, start, T, input_ids.device)
        cos, sin = self.rotary_tables(position_ids, self.model.embed_tokens.weight.dtype)
        logits = self.forward_masked(input_ids, cos, sin, mask, cache, last_only)
        if cache is not None:
            cache.advance(T)
        return logits

    def rotary_tables(self, position_ids, dtype):
        """Return the cos and sin (B, 1, T, Dh) of the rotary embedding at positions (B, T)."""
        freqs = position_ids[:, :, None].float() * self.inv_freq  # (B, T, Dh/2)
        freqs = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, Dh)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def forward_masked(self, input_ids, cos, sin, mask, cache: KVCache | StaticKVCache | None = None,
                       last_only: bool = False):
        """Compute the logits (B, T, V), or (B, 1, V) with last_only, from the rotary tables of
        rotary_tables() and the boolean attention mask (B or 1, 1, T, S) of every query over all S
        keys (None: causal). Unlike forward(), it leaves the cache's length to the caller."""
        x = self.model.embed_tokens(input_ids)
        compiled = self.compile_layers and cache is None
        for i, layer in enumerate(self.model.layers):
            if compiled:
                _mark_layer_sizes_dynamic(x, cos, sin, mask)
                x = _layer_compiled(layer, x, cos, sin, mask)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    @staticmethod
    def _attention_mask(attention_mask, start, T, device):
        """Boolean (B, 1, T, S) mask, or None when plain causal attention is exact."""
        if attention_mask is None and start == 0:
            return None
        S = start + T
        query_pos = torch.arange(start, S, device=device)[:, None]
        key_pos = torch.arange(S, device=device)[None, :]
        mask = (key_pos <= query_pos)[None, None]  # (1, 1, T, S)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :S].bool()
            # a padding query sees no real key; letting it see itself keeps its (unused) output finite
            mask = mask | (key_pos == query_pos)[None, None]
        return mask

    def resize_token_embeddings(self, new_size: int):
        """Grow or shrink the vocabulary; new rows start at the mean of the old embeddings."""
        old_size = self.config.vocab_size
        if new_size == old_size:
            return
        D = self.config.hidden_size
        old_embed = self.model.embed_tokens.weight.data
        embed = nn.Embedding(new_size, D, device=old_embed.device, dtype=old_embed.dtype)
        n = min(old_size, new_size)
        with torch.no_grad():
            embed.weight[:n] = old_embed[:n]
            embed.weight[n:] = old_embed.mean(0)
        self.model.embed_tokens = embed
        if self.config.tie_word_embeddings:
            self.lm_head = nn.Linear(D, new_size, bias=False, device=old_embed.device, dtype=old_embed.dtype)
            self.lm_head.weight = embed.weight
        else:
            old_head = self.lm_head.weight.data
            head = nn.Linear(D, new_size, bias=False, device=old_head.device, dtype=old_head.dtype)
            with torch.no_grad():
                head.weight[:n] = old_head[:n]
                head.weight[n:] = old_head.mean(0)
            self.lm_head = head
        self.config.vocab_size = new_size

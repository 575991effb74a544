import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.compile_fx import compile_fx

import model.transformer as transformer_module
from model.compiled import MaybeCompiled
from model.config import ModelConfig
from model.generate import generate
from model.transformer import KVCache, Transformer, rope_inverse_frequencies

V = 64


def random_ids(B, T, seed=0, low=0):
    return torch.randint(low, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# An independent forward pass, written from the Llama / Qwen2 / Qwen3 definitions


def reference_rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def reference_rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_forward(model: Transformer, ids: torch.Tensor, inv_freq: torch.Tensor | None = None):
    """Logits (B, T, V) of an unpadded batch, computed from the state dict with plain tensor ops."""
    c = model.config
    w = model.state_dict()
    B, T = ids.shape
    H, K, Dh, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
    if inv_freq is None:
        inv_freq = 1.0 / c.rope_theta ** (torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]  # (T, Dh/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, Dh)
    cos, sin = angles.cos().float(), angles.sin().float()
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    x = w["model.embed_tokens.weight"][ids]  # (B, T, D)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = reference_rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = h @ w[p + "self_attn.q_proj.weight"].T
        k = h @ w[p + "self_attn.k_proj.weight"].T
        v = h @ w[p + "self_attn.v_proj.weight"].T
        if c.attention_bias:
            q = q + w[p + "self_attn.q_proj.bias"]
            k = k + w[p + "self_attn.k_proj.bias"]
            v = v + w[p + "self_attn.v_proj.bias"]
        q, k, v = q.view(B, T, H, Dh), k.view(B, T, K, Dh), v.view(B, T, K, Dh)
        if c.qk_norm:
            q = reference_rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
            k = reference_rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, Dh)
        q = q * cos + reference_rotate_half(q) * sin
        k = k * cos + reference_rotate_half(k) * sin
        # key/value head j serves query heads j * H/K ... (j + 1) * H/K - 1, as HF's repeat_kv does
        k = k.repeat_interleave(H // K, dim=1)
        v = v.repeat_interleave(H // K, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(Dh)  # (B, H, T, T)
        scores = scores.masked_fill(~causal, float("-inf"))
        attention = torch.softmax(scores, dim=-1) @ v  # (B, H, T, Dh)
        x = x + attention.transpose(1, 2).reshape(B, T, H * Dh) @ w[p + "self_attn.o_proj.weight"].T
        if c.attention_bias and c.architecture != "Qwen2ForCausalLM":
            x = x + w[p + "self_attn.o_proj.bias"]  # Llama and Qwen3 put the bias on o_proj too
        h = reference_rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = F.silu(h @ w[p + "mlp.gate_proj.weight"].T)
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate * up) @ w[p + "mlp.down_proj.weight"].T
    x = reference_rms_norm(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if c.tie_word_embeddings else w["lm_head.weight"]
    return x @ head.T


REFERENCE_CONFIGS = {
    "llama": dict(),
    "tied": dict(tie_word_embeddings=True),
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "qwen2": dict(architecture="Qwen2ForCausalLM", attention_bias=True),
    "llama_bias": dict(attention_bias=True),
    "qwen3": dict(architecture="Qwen3ForCausalLM", qk_norm=True, head_dim=16),
}


@pytest.mark.parametrize("name", REFERENCE_CONFIGS)
def test_forward_matches_reference(make_model, name):
    model = make_model(**REFERENCE_CONFIGS[name])
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_forward(model, ids), atol=1e-5, rtol=0)


def test_forward_llama3_rope_matches_reference(make_model):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    model = make_model(rope_scaling=scaling, rope_theta=100.0)
    ids = random_ids(2, 12)
    inv_freq = rope_inverse_frequencies(model.config)
    with torch.no_grad():
        logits = model(ids)
        torch.testing.assert_close(logits, reference_forward(model, ids, inv_freq), atol=1e-5, rtol=0)
        # the scaled frequencies must change the result, or the check above proves nothing
        assert not torch.allclose(logits, reference_forward(model, ids), atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Shapes, causality, padding


def test_forward_shape(make_model):
    model = make_model()
    with torch.no_grad():
        assert model(random_ids(3, 7)).shape == (3, 7, V)


def test_forward_last_only(make_model):
    model = make_model()
    ids = random_ids(3, 7)
    with torch.no_grad():
        last = model(ids, last_only=True)
        full = model(ids)
    assert last.shape == (3, 1, V)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)


def test_forward_causal(make_model):
    model = make_model()
    ids = random_ids(2, 10)
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :6], before[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, 6:], before[:, 6:], atol=1e-4)


def test_left_padding_matches_unpadded(make_model):
    model = make_model()
    lengths = [9, 4, 1, 6]
    rows = [random_ids(1, n, seed=i, low=1)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    pad_id = 0
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, T - len(row):] = row
        mask[i, T - len(row):] = 1
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = model(row[None])[0]
            torch.testing.assert_close(padded[i, T - len(row):], alone, atol=1e-5, rtol=0, msg=f"row {i}")


def test_left_padding_logits_finite(make_model):
    model = make_model()
    ids = torch.tensor([[0, 0, 0, 5, 6], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 0, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        assert torch.isfinite(model(ids, attention_mask=mask)).all()


def test_explicit_position_ids_shift(make_model):
    # rope depends only on relative positions, so shifting every position by 5 leaves logits unchanged
    model = make_model()
    ids = random_ids(2, 8)
    positions = torch.arange(8).expand(2, 8)
    with torch.no_grad():
        plain = model(ids, position_ids=positions)
        shifted = model(ids, position_ids=positions + 5)
    torch.testing.assert_close(shifted, plain, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Compiled layers (train.py --compile-layers)


COUNTED_COPIES = itertools.count()


def count_layer_graphs(monkeypatch) -> tuple[MaybeCompiled, list]:
    """Route the compiled layer function through a fresh torch.compile with inductor, and return it
    with the list of graphs that inductor compiles for it."""
    graphs = []

    def inductor(graph, example_inputs):
        graphs.append(graph)
        return compile_fx(graph, example_inputs)

    # torch.compile keeps what it compiled per code object, so each copy gets a code object of its own
    layer = transformer_module._layer
    fresh = type(layer)(layer.__code__.replace(co_name=f"layer_{next(COUNTED_COPIES)}"), layer.__globals__)
    counted = MaybeCompiled(fresh)
    counted.compiled = torch.compile(fresh, dynamic=True, backend=inductor)
    monkeypatch.setattr(transformer_module, "_layer_compiled", counted)
    return counted, graphs


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padded"])
def test_compiled_layers_match_eager(make_model, monkeypatch, padded):
    model = make_model(**REFERENCE_CONFIGS["qwen3"])  # q/k norms and a head width of its own
    ids = random_ids(3, 9)
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
    compiled_layer, graphs = count_layer_graphs(monkeypatch)
    compiled_calls = []
    monkeypatch.setattr(transformer_module, "_layer_compiled",
                        lambda *args: compiled_calls.append(1) or compiled_layer(*args))
    results = []
    for compiled in (False, True):
        model.compile_layers = compiled
        model.zero_grad()
        logits = model(ids, attention_mask=mask)
        logits.square().mean().backward()  # every logit gets a gradient
        results.append((logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    assert len(compiled_calls) == model.config.num_hidden_layers
    assert compiled_layer.enabled, "compilation failed and fell back to eager"
    assert len(graphs) == 1, "inductor compiled no graph, or one per layer"
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_layers_keep_batch_and_length_symbolic(make_model, monkeypatch):
    # the first batch's size equals the head width (32), which torch.compile once compiled in as a constant
    model = make_model(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    assert model.config.head_dim == 32
    model.compile_layers = True
    _, graphs = count_layer_graphs(monkeypatch)
    for B, T in [(32, 5), (7, 5), (3, 32), (3, 11)]:
        model(random_ids(B, T)).sum().backward()
    assert len(graphs) == 1


def test_generation_does_not_compile_layers(make_model, monkeypatch):
    # the forward passes of generate use a KV cache, so they never call the compiled layer function
    model = make_model()
    prompts = [[1, 2, 3], [4, 5]]
    expected = generate(model, prompts, max_new_tokens=4, stop_ids=[], pad_id=0, temperature=0.0)

    def reject(*args):
        raise AssertionError("generate ran a compiled layer")

    monkeypatch.setattr(transformer_module, "_layer_compiled", reject)
    model.compile_layers = True
    assert generate(model, prompts, max_new_tokens=4, stop_ids=[], pad_id=0, temperature=0.0).tokens == expected.tokens


# ---------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("prefill", [1, 5])
def test_kv_cache_matches_full_forward(make_model, prefill):
    model = make_model()
    ids = random_ids(2, 10)
    cache = KVCache(model.config, 2, 10, "cpu", torch.float32)
    with torch.no_grad():
        full = model(ids)
        pieces = [model(ids[:, :prefill], cache=cache)]
        for t in range(prefill, 10):
            pieces.append(model(ids[:, t:t + 1], cache=cache))
    assert cache.length == 10
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_left_padded(make_model):
    model = make_model()
    ids = torch.tensor([[0, 0, 7, 8, 9, 10, 11], [3, 4, 5, 6, 7, 8, 9]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    cache = KVCache(model.config, 2, 7, "cpu", torch.float32)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        pieces = [model(ids[:, :4], attention_mask=mask[:, :4], cache=cache)]
        for t in range(4, 7):
            pieces.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache))
    steps = torch.cat(pieces, dim=1)
    torch.testing.assert_close(steps[0, 2:], full[0, 2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(steps[1], full[1], atol=1e-5, rtol=0)


def test_kv_cache_overflow(make_model):
    model = make_model()
    cache = KVCache(model.config, 1, 4, "cpu", torch.float32)
    with torch.no_grad():
        model(random_ids(1, 3), cache=cache)
        with pytest.raises(ValueError, match="KV cache overflow: 5 positions needed, 4 allocated"):
            model(random_ids(1, 2), cache=cache)


def test_kv_cache_select_rows(make_model):
    model = make_model()
    ids = random_ids(2, 6)
    cache = KVCache(model.config, 2, 6, "cpu", torch.float32)
    with torch.no_grad():
        full = model(ids)
        model(ids[:, :5], cache=cache)
        cache.select_rows(torch.tensor([1, 1, 0]))
        step = model(ids[[1, 1, 0], 5:6], cache=cache)[:, 0]
    torch.testing.assert_close(step, full[[1, 1, 0], 5], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Grouped-query attention


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_equals_repeated_heads(make_model, kv_heads):
    # a GQA model equals the multi-head model whose k/v heads are the GQA heads, each repeated
    # for its group of query heads
    gqa = make_model(num_key_value_heads=kv_heads)
    mha = Transformer(ModelConfig.from_preset("tiny", vocab_size=V, num_key_value_heads=4)).eval()
    H, Dh, D = 4, gqa.config.head_dim, gqa.config.hidden_size
    state = dict(gqa.state_dict())
    for i in range(gqa.config.num_hidden_layers):
        for proj in ("k_proj", "v_proj"):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            heads = state[key].view(kv_heads, Dh, D)
            state[key] = heads.repeat_interleave(H // kv_heads, dim=0).reshape(H * Dh, D)
    mha.load_state_dict(state)
    ids = random_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_kv_projection_shape(make_model, kv_heads):
    model = make_model(num_key_value_heads=kv_heads)
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.weight.shape == (kv_heads * 8, 32)
    assert attention.v_proj.weight.shape == (kv_heads * 8, 32)
    assert attention.q_proj.weight.shape == (32, 32)


# ---------------------------------------------------------------------------------------------
# Rotary frequencies


def test_rope_frequencies_formula():
    config = ModelConfig.from_preset("tiny", head_dim=16, rope_theta=500.0)
    expected = torch.tensor([500.0 ** (-2 * i / 16) for i in range(8)])
    torch.testing.assert_close(rope_inverse_frequencies(config), expected, atol=0, rtol=1e-6)


def test_rope_llama3_scaling():
    # theta 10000, head_dim 16: wavelengths 2*pi*10000**(i/8) = 6.3, 19.9, 62.8, 198.7, 628.3,
    # 1986.9, 6283.2, 19869.2. With an original context of 1024 and low/high factors 1 and 4,
    # wavelengths below 1024/4 = 256 are kept, those above 1024/1 are divided by the factor and
    # 628.3 lies in between.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 1024}
    plain = [10000.0 ** (-i / 8) for i in range(8)]
    scaled = rope_inverse_frequencies(ModelConfig(head_dim=16, rope_scaling=scaling)).tolist()
    for i in range(4):
        assert scaled[i] == pytest.approx(plain[i], rel=1e-6), i
    for i in range(5, 8):
        assert scaled[i] == pytest.approx(plain[i] / 8.0, rel=1e-6), i
    smooth = (1024 / (2 * math.pi / plain[4]) - 1.0) / (4.0 - 1.0)
    assert 0 < smooth < 1
    assert scaled[4] == pytest.approx((1 - smooth) * plain[4] / 8.0 + smooth * plain[4], rel=1e-6)


def test_rope_default_scaling_unchanged():
    plain = rope_inverse_frequencies(ModelConfig())
    default = rope_inverse_frequencies(ModelConfig(rope_scaling={"rope_type": "default"}))
    assert torch.equal(default, plain)


def test_bf16_cast_keeps_rope_fp32(make_model):
    model = make_model().to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32


def test_rope_buffer_not_in_state_dict(make_model):
    model = make_model()
    assert "inv_freq" not in model.state_dict()
    assert torch.equal(model.inv_freq, rope_inverse_frequencies(model.config))


# ---------------------------------------------------------------------------------------------
# Parameter names and family options


def hf_names(layers: int, bias: bool = False, qk_norm: bool = False, tied: bool = False,
             o_bias: bool = False) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not tied:
        names.add("lm_head.weight")
    for i in range(layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {p + f"self_attn.{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj", "o_proj")}
        names |= {p + f"mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")}
        if bias:
            names |= {p + f"self_attn.{proj}.bias" for proj in ("q_proj", "k_proj", "v_proj")}
        if o_bias:
            names.add(p + "self_attn.o_proj.bias")
        if qk_norm:
            names |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
    return names


def test_parameter_names_llama(make_model):
    model = make_model()
    assert {name for name, _ in model.named_parameters()} == hf_names(2)


def test_parameter_names_qwen2(make_model):
    model = make_model(architecture="Qwen2ForCausalLM", attention_bias=True, tie_word_embeddings=True)
    assert {name for name, _ in model.named_parameters()} == hf_names(2, bias=True, tied=True)


def test_parameter_names_llama_bias(make_model):
    # transformers' Llama and Qwen3 put attention_bias on o_proj as well. Qwen2 never does.
    model = make_model(attention_bias=True)
    assert {name for name, _ in model.named_parameters()} == hf_names(2, bias=True, o_bias=True)


def test_parameter_names_qwen3(make_model):
    model = make_model(architecture="Qwen3ForCausalLM", qk_norm=True)
    assert {name for name, _ in model.named_parameters()} == hf_names(2, qk_norm=True)


def test_qk_norm_shape(make_model):
    model = make_model(qk_norm=True, head_dim=16)
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    assert model.model.layers[0].self_attn.k_norm.weight.shape == (16,)


def test_qk_norm_changes_output(make_model):
    # both models get the same weights except the q/k norms, so only the norms can change the output
    ids = random_ids(1, 6)
    plain = make_model(seed=3)
    normed = make_model(seed=4, qk_norm=True)
    missing, unexpected = normed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(f"model.layers.{i}.self_attn.{n}_norm.weight" for i in range(2) for n in "qk")
    assert unexpected == []
    with torch.no_grad():
        assert not torch.allclose(plain(ids), normed(ids), atol=1e-4)


def test_attention_bias_used(make_model):
    model = make_model(attention_bias=True)
    ids = random_ids(1, 6)
    with torch.no_grad():
        before = model(ids)
        model.model.layers[0].self_attn.q_proj.bias.zero_()
        assert not torch.allclose(model(ids), before, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Tied embeddings, init, resize


def test_tied_embeddings_share_storage(make_model):
    model = make_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_untied_embeddings_separate(make_model):
    model = make_model()
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_init_weights_seeded():
    config = ModelConfig.from_preset("tiny", vocab_size=V, attention_bias=True, qk_norm=True)
    first, second = Transformer(config), Transformer(config)
    first.init_weights(seed=7)
    second.init_weights(seed=7)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name


def test_init_weights_norms_and_biases():
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=V, attention_bias=True, qk_norm=True))
    model.init_weights(seed=0)
    attention = model.model.layers[0].self_attn
    assert torch.equal(attention.q_norm.weight, torch.ones(8))
    assert torch.equal(model.model.layers[1].input_layernorm.weight, torch.ones(32))
    assert torch.equal(attention.q_proj.bias, torch.zeros(32))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_resize_grow(make_model, tied):
    model = make_model(tie_word_embeddings=tied)
    old_embed = model.model.embed_tokens.weight.detach().clone()
    old_head = model.lm_head.weight.detach().clone()
    ids = random_ids(2, 7)
    with torch.no_grad():
        old_logits = model(ids)
    model.resize_token_embeddings(V + 5)

    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert model.config.vocab_size == V + 5
    assert embed.shape == (V + 5, 32)
    assert head.shape == (V + 5, 32)
    assert torch.equal(embed[:V], old_embed)
    assert torch.equal(head[:V], old_head)
    torch.testing.assert_close(embed[V:], old_embed.mean(0).expand(5, -1), atol=1e-7, rtol=0)
    torch.testing.assert_close(head[V:], old_head.mean(0).expand(5, -1), atol=1e-7, rtol=0)
    with torch.no_grad():
        new_logits = model(ids)
    assert new_logits.shape == (2, 7, V + 5)
    torch.testing.assert_close(new_logits[..., :V], old_logits, atol=1e-6, rtol=0)


def test_resize_tied_stays_tied(make_model):
    model = make_model(tie_word_embeddings=True)
    model.resize_token_embeddings(V + 3)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_resize_shrink(make_model):
    model = make_model()
    old_embed = model.model.embed_tokens.weight.detach().clone()
    model.resize_token_embeddings(V - 4)
    assert torch.equal(model.model.embed_tokens.weight, old_embed[:V - 4])
    assert model.lm_head.weight.shape == (V - 4, 32)


def test_resize_same_size_noop(make_model):
    model = make_model()
    embed = model.model.embed_tokens
    model.resize_token_embeddings(V)
    assert model.model.embed_tokens is embed

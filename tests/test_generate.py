import itertools

import pytest
import torch

from model import generate as generate_module
from model.compiled import MaybeCompiled
from model.generate import (generate, keyed_uniforms, row_key, sample_blocked, sample_categorical, sample_next,
                            sample_with_logprobs, sampling_logprobs)
from pcl.losses import token_logprobs
from pcl.sequence import Segment, Sequence, collate

PAD = 0
PROMPTS = [[5, 9, 12, 3, 7], [8, 2], [4, 11, 6, 1, 9, 13, 2, 10]]


@pytest.fixture
def model(make_model):
    # lm_head std 0.5 (instead of 0.1) makes the greedy choice clear of float rounding
    model = make_model(seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
    return model


def greedy_without_cache(model, prompt, max_new_tokens, stop_ids=()):
    """Greedy tokens from a full forward over the whole sequence at every step."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(next_id)
            ids.append(next_id)
            if next_id in stop_ids:
                break
    return out


def completion_logprobs(model, prompt, completion, temperature):
    """log_softmax(logits / temperature) at each completion id, from one forward over prompt + completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1]  # (len(completion), V)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# Greedy decoding against recomputation


def test_greedy_matches_no_cache(model):
    result = generate(model, PROMPTS, max_new_tokens=8, stop_ids=[], pad_id=PAD, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        assert result.tokens[i] == greedy_without_cache(model, prompt, 8), f"row {i}"


def test_greedy_rows_leave_batch(model):
    # stop each row at a different step, so later steps run with fewer rows in the cache
    references = [greedy_without_cache(model, p, 10) for p in PROMPTS]
    stop_ids = [[reference[k]] for reference, k in zip(references, (2, 5, 0))]
    result = generate(model, PROMPTS, max_new_tokens=10, stop_ids=stop_ids, pad_id=PAD, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        assert result.tokens[i] == greedy_without_cache(model, prompt, 10, stop_ids[i]), f"row {i}"


def test_greedy_pad_id_irrelevant(model):
    first = generate(model, PROMPTS, max_new_tokens=6, stop_ids=[], pad_id=PAD, temperature=0.0)
    second = generate(model, PROMPTS, max_new_tokens=6, stop_ids=[], pad_id=31, temperature=0.0)
    assert first.tokens == second.tokens


def test_greedy_logprobs_unscaled(model):
    result = generate(model, PROMPTS, max_new_tokens=5, stop_ids=[], pad_id=PAD, temperature=0.0)
    for i, prompt in enumerate(PROMPTS):
        expected = completion_logprobs(model, prompt, result.tokens[i], temperature=1.0)
        torch.testing.assert_close(result.logprobs[i], expected, atol=1e-5, rtol=0, msg=f"row {i}")


# ---------------------------------------------------------------------------------------------
# Sampled log-probabilities


def test_logprobs_match_full_forward(model):
    generator = torch.Generator().manual_seed(0)
    result = generate(model, PROMPTS, max_new_tokens=7, stop_ids=[], pad_id=PAD, num_samples=3,
                      temperature=0.7, generator=generator)
    assert len(result.tokens) == 9
    for row, tokens in enumerate(result.tokens):
        prompt = PROMPTS[row // 3]
        expected = completion_logprobs(model, prompt, tokens, temperature=0.7)
        assert result.logprobs[row].dtype == torch.float32
        torch.testing.assert_close(result.logprobs[row], expected, atol=1e-5, rtol=0, msg=f"row {row}")


FAMILIES = {
    "llama3": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(architecture="Qwen2ForCausalLM", attention_bias=True, tie_word_embeddings=True),
    "qwen3": dict(architecture="Qwen3ForCausalLM", qk_norm=True, head_dim=16),
}


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
@pytest.mark.parametrize("family", FAMILIES)
def test_logprobs_match_training_batch(make_model, family, temperature):
    # The GRPO update recomputes log-probs from a right-padded batch of whole sequences with no
    # attention mask. They must equal the sampler's, which came from left-padded prompts and a KV
    # cache that drops finished rows, so that the importance ratio of the first step is 1.
    model = make_model(seed=2, **FAMILIES[family])
    generator = torch.Generator().manual_seed(0)
    result = generate(model, PROMPTS, max_new_tokens=12, stop_ids=[3, 17], pad_id=PAD, num_samples=3,
                      temperature=temperature, generator=generator)
    prompts = [p for p in PROMPTS for _ in range(3)]
    sequences = [Sequence(p + t, [int(Segment.PROMPT)] * len(p) + [int(Segment.REASONING)] * len(t))
                 for p, t in zip(prompts, result.tokens)]
    input_ids, _ = collate(sequences, pad_id=PAD)  # (B, T)
    model.train()
    with torch.no_grad():
        training = token_logprobs(model(input_ids)[:, :-1], input_ids[:, 1:], temperature)  # (B, T-1)
    for row, (prompt, sampled) in enumerate(zip(prompts, result.logprobs)):
        start = len(prompt) - 1  # the first generated id is the target of the last prompt position
        recomputed = training[row, start:start + len(sampled)]
        torch.testing.assert_close(recomputed, sampled, atol=1e-5, rtol=0, msg=f"row {row}")
        ratio = torch.exp(recomputed - sampled)
        assert (ratio - 1).abs().max() <= 1e-5, f"row {row}"


def test_logprobs_length(model):
    result = generate(model, PROMPTS, max_new_tokens=7, stop_ids=[], pad_id=PAD, num_samples=2,
                      temperature=1.0, generator=torch.Generator().manual_seed(0))
    for row in range(6):
        assert result.logprobs[row].shape == (len(result.tokens[row]),), f"row {row}"


# ---------------------------------------------------------------------------------------------
# Stop ids


def first_new_token_index(tokens, start):
    """Index of the first token at or after `start` that does not occur before it."""
    return next(k for k in range(start, len(tokens)) if tokens[k] not in tokens[:k])


def test_per_row_stop_ids(model):
    prompts = PROMPTS[:2]
    references = [greedy_without_cache(model, p, 8) for p in prompts]
    k = first_new_token_index(references[0], 2)
    unused = next(i for i in range(1, 64) if i not in references[1])
    stop_ids = [[references[0][k], unused], [unused]]
    result = generate(model, prompts, max_new_tokens=8, stop_ids=stop_ids, pad_id=PAD, temperature=0.0)
    assert result.tokens[0] == references[0][:k + 1]
    assert result.stopped[0] is True
    assert result.tokens[1] == references[1]
    assert result.stopped[1] is False


def test_stop_on_first_token(model):
    first = greedy_without_cache(model, PROMPTS[1], 1)[0]
    result = generate(model, [PROMPTS[1]], max_new_tokens=8, stop_ids=[first], pad_id=PAD, temperature=0.0)
    assert result.tokens == [[first]]
    assert result.stopped == [True]


def test_stop_on_last_step_counts_as_stopped(model):
    reference = greedy_without_cache(model, PROMPTS[0], 8)
    k = first_new_token_index(reference, 1)
    result = generate(model, [PROMPTS[0]], max_new_tokens=k + 1, stop_ids=[reference[k]], pad_id=PAD,
                      temperature=0.0)
    assert result.tokens == [reference[:k + 1]]
    assert result.stopped == [True]


def test_stop_ids_shared(model):
    # a flat list applies to every row
    firsts = [greedy_without_cache(model, p, 1)[0] for p in PROMPTS]
    result = generate(model, PROMPTS, max_new_tokens=8, stop_ids=firsts, pad_id=PAD, temperature=0.0)
    assert result.tokens == [[f] for f in firsts]
    assert result.stopped == [True, True, True]


def test_stop_ids_wrong_row_count(model):
    with pytest.raises(ValueError, match="stop_ids has 2 lists, expected one per output row \\(6\\)"):
        generate(model, PROMPTS[:2], max_new_tokens=4, stop_ids=[[1], [2]], pad_id=PAD, num_samples=3)


def test_prompt_id_out_of_range(model):
    with pytest.raises(ValueError, match="token id 64 in the prompts or pad_id is out of range for the "
                                         r"embedding matrix \(64 rows\)"):
        generate(model, [[1, 64]], max_new_tokens=2, stop_ids=[], pad_id=PAD)


def test_pad_id_out_of_range(model):
    with pytest.raises(ValueError, match="token id 70 in the prompts or pad_id is out of range"):
        generate(model, PROMPTS, max_new_tokens=2, stop_ids=[], pad_id=70)


def test_max_new_tokens_cut(model):
    result = generate(model, PROMPTS, max_new_tokens=3, stop_ids=[], pad_id=PAD, temperature=0.0)
    assert [len(t) for t in result.tokens] == [3, 3, 3]
    assert result.stopped == [False, False, False]


# ---------------------------------------------------------------------------------------------
# Samples per prompt, seeds, top-p


def test_num_samples_greedy_identical(model):
    single = generate(model, PROMPTS, max_new_tokens=6, stop_ids=[], pad_id=PAD, temperature=0.0)
    grouped = generate(model, PROMPTS, max_new_tokens=6, stop_ids=[], pad_id=PAD, num_samples=4,
                       temperature=0.0)
    for row, tokens in enumerate(grouped.tokens):
        assert tokens == single.tokens[row // 4], f"row {row}"


def test_num_samples_row_order(model):
    # row i * G + j is sample j of prompt i, so with G = 2 and a stop id that only prompt 1 emits
    # first, exactly rows 2 and 3 stop after one token
    firsts = [greedy_without_cache(model, p, 1)[0] for p in PROMPTS]
    assert firsts[1] not in (firsts[0], firsts[2])
    result = generate(model, PROMPTS, max_new_tokens=4, stop_ids=[firsts[1]], pad_id=PAD, num_samples=2,
                      temperature=0.0)
    assert [len(t) == 1 for t in result.tokens] == [False, False, True, True, False, False]


def test_seeded_sampling_reproducible(model):
    def sample(seed):
        return generate(model, PROMPTS, max_new_tokens=8, stop_ids=[], pad_id=PAD, num_samples=2,
                        temperature=1.0, generator=torch.Generator().manual_seed(seed))

    first, second = sample(123), sample(123)
    assert first.tokens == second.tokens
    for row in range(6):
        assert torch.equal(first.logprobs[row], second.logprobs[row]), f"row {row}"


def test_different_seeds_differ(model):
    def sample(seed):
        return generate(model, PROMPTS, max_new_tokens=8, stop_ids=[], pad_id=PAD, num_samples=2,
                        temperature=1.0, generator=torch.Generator().manual_seed(seed)).tokens

    assert sample(1) != sample(2)


def test_samples_of_prompt_differ(model):
    # sharing the prompt's cache must not share the randomness of its samples
    result = generate(model, [PROMPTS[0]], max_new_tokens=8, stop_ids=[], pad_id=PAD, num_samples=4,
                      temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert len({tuple(t) for t in result.tokens}) > 1


def test_tiny_top_p_is_greedy(model):
    greedy = generate(model, PROMPTS, max_new_tokens=8, stop_ids=[], pad_id=PAD, temperature=0.0)
    nucleus = generate(model, PROMPTS, max_new_tokens=8, stop_ids=[], pad_id=PAD, num_samples=1,
                       temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert nucleus.tokens == greedy.tokens


def test_sample_next_top_p_support():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logprobs = probs.log().expand(2000, 4)
    drawn = sample_next(logprobs, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    # token 2 is dropped: the tokens above it already cover 0.8 >= 0.7 of the mass
    assert set(drawn.tolist()) == {0, 1}


def test_sample_next_top_p_renormalised():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logprobs = probs.log().expand(4000, 4)
    drawn = sample_next(logprobs, temperature=1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    # the kept mass is 0.5 : 0.3, so token 0 has probability 0.625. Over 4000 draws the std of the
    # observed frequency is about 0.008.
    assert (drawn == 0).float().mean().item() == pytest.approx(0.625, abs=0.04)


def test_sampling_logprobs_temperature():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    expected = torch.log_softmax(logits / 0.5, dim=-1)
    torch.testing.assert_close(sampling_logprobs(logits, 0.5), expected)


def test_sampling_logprobs_greedy_unscaled():
    logits = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.bfloat16)
    result = sampling_logprobs(logits, 0.0)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, torch.log_softmax(logits.float(), dim=-1))


# ---------------------------------------------------------------------------------------------
# Keyed sampling


def test_keyed_sampling_ignores_batch(model):
    # a row's draws depend on its key only, so sampling a part of the batch gives the same rows
    keys = [row_key(0, "test", i, j) for i in range(len(PROMPTS)) for j in range(2)]
    whole = generate(model, PROMPTS, max_new_tokens=8, stop_ids=[], pad_id=PAD, num_samples=2, temperature=1.0,
                     row_keys=keys)
    part = generate(model, PROMPTS[1:], max_new_tokens=8, stop_ids=[], pad_id=PAD, num_samples=2, temperature=1.0,
                    row_keys=keys[2:])
    assert part.tokens == whole.tokens[2:]
    assert len({tuple(t) for t in whole.tokens}) > 1


def test_keyed_sampling_frequencies():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logprobs = probs.log().expand(4000, 4)
    uniforms = keyed_uniforms(torch.tensor([row_key(0, i) for i in range(4000)]), position=3)
    drawn = sample_next(logprobs, temperature=1.0, top_p=1.0, uniforms=uniforms)
    # over 4000 draws the std of each observed frequency is at most about 0.008
    torch.testing.assert_close(torch.bincount(drawn, minlength=4) / 4000, probs[0], atol=0.03, rtol=0)
    nucleus = sample_next(logprobs, temperature=1.0, top_p=0.7, uniforms=uniforms)
    assert set(nucleus.tolist()) == {0, 1}


def test_row_keys_length_checked(model):
    with pytest.raises(ValueError, match="row_keys has 1 keys, expected one per output row"):
        generate(model, PROMPTS, max_new_tokens=2, stop_ids=[], pad_id=PAD, temperature=1.0, row_keys=[1])


def test_categorical_frequencies():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]]).expand(20000, 4)
    drawn = sample_categorical(probs, torch.rand(len(probs), generator=torch.Generator().manual_seed(0)))
    frequencies = torch.bincount(drawn, minlength=4).float() / len(drawn)
    # the std of each observed frequency is at most about 0.0035
    torch.testing.assert_close(frequencies, probs[0], atol=0.015, rtol=0)


def test_categorical_unnormalised_rows():
    probs = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0], [3.0, 0.0, 0.0, 0.0]])
    drawn = sample_categorical(probs, torch.rand(len(probs), generator=torch.Generator().manual_seed(0)))
    assert drawn.tolist() == [1, 3, 0]


def test_categorical_draw_at_total_mass():
    # a uniform number that rounds the threshold up to the total mass must not pick the trailing
    # zero-probability ids
    probs = torch.tensor([[0.2, 0.5, 0.3, 0.0, 0.0]])
    assert sample_categorical(probs, torch.ones(1, dtype=torch.float64)).tolist() == [2]


@pytest.fixture(params=["eager", "compiled"])
def blocked_sampler(request):
    """sample_blocked, run eagerly or through torch.compile as inside the compiled decode step."""
    if request.param == "eager":
        return sample_blocked
    return torch.compile(sample_blocked, dynamic=True)


@pytest.mark.parametrize("vocab", [2048, 2000, 37])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_blocked_sampler_matches_reference(blocked_sampler, vocab, temperature):
    # The reference draws from the cumulative sum over the whole vocabulary, and the blocked sampler
    # sums in blocks (2000 and 37 ids leave the last block short). Both must pick the same ids.
    generator = torch.Generator().manual_seed(vocab)
    scale = torch.tensor([1.0, 4.0, 30.0]).repeat_interleave(100)[:, None]  # 30: many ids exp() to 0 in fp32
    logits = torch.randn(300, vocab, generator=generator) * scale
    uniforms = torch.rand(300, generator=generator, dtype=torch.float64)
    ids, logprobs = blocked_sampler(logits, temperature, uniforms)
    expected_ids, expected_logprobs = sample_with_logprobs(logits, temperature, 1.0, uniforms)
    assert ids.tolist() == expected_ids.tolist()
    torch.testing.assert_close(logprobs, expected_logprobs, atol=1e-5, rtol=1e-5)
    # At u = 0 and within rounding of 1 the two may pick different ids of the rounding-sized tail,
    # but every draw must be a valid id with a finite log-probability.
    for u in (0.0, 1 - 2.0 ** -53, 1.0):  # 1.0: see sample_categorical
        ids, logprobs = blocked_sampler(logits, temperature, torch.full((300,), u, dtype=torch.float64))
        assert ((ids >= 0) & (ids < vocab)).all(), u
        assert torch.isfinite(logprobs).all(), u


def test_blocked_sampler_rounding_fallback():
    # With torch 2.13 on x86-64, these logits put the first block's float64 sum one rounding step above
    # the cumulative sum inside it, so at u = 1 no id passes the threshold and the fallback picks the id.
    # It must be the first id that reaches the total, as in sample_categorical, not the block's last
    # id (probability about 1e-42).
    finite = [10.345311164855957, -6.6386847496032715, 64.81097412109375, 25.73446273803711, -57.40557861328125,
              11.537744522094727, 49.3563117980957, 15.501708984375, 21.869529724121094, 28.9705867767334,
              6.6868696212768555, -37.416507720947266, 39.510746002197266, 0.7060828804969788, -24.13774871826172,
              -30.97378158569336, -51.3205451965332, -26.07556915283203, -7.677028656005859, -85.94579315185547]
    logits = torch.tensor([finite + [float("-inf")] * 20])
    uniforms = torch.ones(1, dtype=torch.float64)
    ids, logprobs = sample_blocked(logits, 1.0, uniforms)
    expected_ids, _ = sample_with_logprobs(logits, 1.0, 1.0, uniforms)
    assert ids.tolist() == expected_ids.tolist() == [12]
    assert torch.isfinite(logprobs).all()


def test_samplers_give_id_0_to_diverged_rows():
    # NaN logits (a diverged model) must not give the out-of-range id V: generate raised an index error on it
    logits = torch.randn(4, 40)
    logits[1] = float("nan")
    logits[2] = float("-inf")
    uniforms = torch.full((4,), 0.5, dtype=torch.float64)
    blocked_ids, _ = sample_blocked(logits, 1.0, uniforms)
    reference_ids, _ = sample_with_logprobs(logits, 1.0, 1.0, uniforms)
    assert blocked_ids[1:3].tolist() == [0, 0]
    assert reference_ids[1:3].tolist() == [0, 0]
    assert sample_categorical(torch.zeros(1, 5), torch.full((1,), 0.5, dtype=torch.float64)).tolist() == [0]


def test_blocked_sampler_never_draws_zero_probability():
    # At u within rounding of 1, the draw falls on the last id with probability above 0.
    logits = torch.full((2, 40), float("-inf"))
    logits[0, [3, 17]] = torch.tensor([0.0, 1.0])
    logits[1, 5] = 2.0
    ids, logprobs = sample_blocked(logits, 1.0, torch.tensor([1.0, 1 - 2.0 ** -53], dtype=torch.float64))
    assert ids.tolist() == [17, 5]
    assert torch.isfinite(logprobs).all()


# ---------------------------------------------------------------------------------------------
# Compiled decode step


@pytest.fixture(params=["compiled", "eager"])
def decode_path(request, monkeypatch):
    """generate(compile=True) through torch.compile, or through the same static-cache step run
    eagerly (the fallback where compilation is unavailable)."""
    step = generate_module._decode_step_compiled
    if request.param == "eager":
        monkeypatch.setattr(step, "enabled", False)
    yield request.param
    if request.param == "compiled":
        assert step.enabled, "torch.compile failed and the decode step fell back to eager"


def test_static_decode_greedy_matches_no_cache(model, decode_path):
    # rows stop at different steps, so later steps run with fewer rows and the cache shrinks
    references = [greedy_without_cache(model, p, 10) for p in PROMPTS]
    stop_ids = [[reference[k]] for reference, k in zip(references, (2, 5, 0))]
    result = generate(model, PROMPTS, max_new_tokens=10, stop_ids=stop_ids, pad_id=PAD, temperature=0.0,
                      compile=True)
    for i, prompt in enumerate(PROMPTS):
        assert result.tokens[i] == greedy_without_cache(model, prompt, 10, stop_ids[i]), f"row {i}"


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9)])  # the last: nucleus
def test_static_decode_matches_eager_sampling(model, decode_path, temperature, top_p):
    keys = [row_key(0, "test", i, j) for i in range(len(PROMPTS)) for j in range(3)]
    options = dict(max_new_tokens=12, stop_ids=[17, 23], pad_id=PAD, num_samples=3, temperature=temperature,
                   top_p=top_p, row_keys=keys)
    eager = generate(model, PROMPTS, **options)
    static = generate(model, PROMPTS, compile=True, **options)
    assert any(eager.stopped), "the test needs rows that stop early"
    assert not all(eager.stopped), "the test needs rows that run to max_new_tokens"
    assert static.tokens == eager.tokens
    assert static.stopped == eager.stopped
    for a, b in zip(static.logprobs, eager.logprobs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


COUNTED_COPIES = itertools.count()


def count_compilations(monkeypatch):
    """Route generate's compiled decode step through a fresh torch.compile that counts compilations."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    step = generate_module._decode_step
    # The copy gets a code object of its own name, because torch.compile keeps what it learnt about
    # sizes per code object, and identical code objects compare equal.
    code = step.__code__.replace(co_name=f"decode_step_{next(COUNTED_COPIES)}")
    fresh = type(step)(code, step.__globals__)
    counted = MaybeCompiled(fresh)
    counted.compiled = torch.compile(fresh, dynamic=True, backend=counter)  # called with MaybeCompiled's settings
    monkeypatch.setattr(generate_module, "_decode_step_compiled", counted)
    return counter


def test_static_decode_compiles_once(model, monkeypatch):
    # The tiny model has 2 key/value heads, as many as the first step's cache length. One symbol
    # for both made the second step compile again.
    counter = count_compilations(monkeypatch)
    for max_new_tokens in (6, 9):  # the second call's cache buffer has other strides
        generate(model, PROMPTS, max_new_tokens=max_new_tokens, stop_ids=[], pad_id=PAD, num_samples=2,
                 temperature=1.0, row_keys=list(range(6)), compile=True)
        assert counter.frame_count == 1, f"max_new_tokens={max_new_tokens}"


def test_static_decode_one_sample_compiles_once(model, monkeypatch):
    # With one sample per prompt, rows and prompts start equal in number and part when a row stops.
    counter = count_compilations(monkeypatch)
    first_row = generate(model, PROMPTS, max_new_tokens=6, stop_ids=[], pad_id=PAD, temperature=0.0).tokens[0]
    step = next(k for k in range(2, 6) if first_row[k] not in first_row[:k])  # a stop after some compiled steps
    stop_ids = [[first_row[step]], [], []]
    result = generate(model, PROMPTS, max_new_tokens=6, stop_ids=stop_ids, pad_id=PAD, temperature=0.0, compile=True)
    assert len(result.tokens[0]) == step + 1
    assert result.stopped == [True, False, False]
    assert counter.frame_count == 1

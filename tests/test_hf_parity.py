"""Parity with the `transformers` implementations of Llama, Qwen2 and Qwen3.

transformers builds randomly initialised models of each family from small configs and writes them
with its own save_pretrained. Our loader must reproduce their logits and greedy generations, and
transformers must load what our save_pretrained writes. transformers is a test-only dependency,
and product code never imports it.
"""

import json

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", minversion="5.0",
    reason="the parity tests compare against transformers 5; install it with pip install -r requirements-dev.txt",
)

from conftest import write_hf_style_tokenizer  # noqa: E402  (after the skip, like every import below)
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer as HFTokenizer  # noqa: E402

from bench.common import left_pad  # noqa: E402
from model.checkpoint import INDEX_NAME, WEIGHTS_NAME, load_pretrained, save_pretrained  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.generate import generate  # noqa: E402
from model.tokenizer import PCL_TOKENS, Tokenizer  # noqa: E402

VOCAB = 300
# LlamaConfig defaults to bos 1 and eos 2, and generate would stop at that eos, so both are unset
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None)
# Theta 500000 and head_dim 16 give rope wavelengths of 6, 32, 167, 862, ... positions. With an
# original context of 256 the first two are kept, 165 is blended and the rest are divided by 8,
# so every branch of the llama3 scaling is used.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}

# (model_type, config overrides) of each family variant
CASES = {
    "llama3_rope": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "llama_bias": ("llama", dict(attention_bias=True)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "qwen2_untied": ("qwen2", dict(tie_word_embeddings=False)),
    # head_dim 32 with 4 heads of a 64-wide model: q_proj maps 64 -> 128
    "qwen3_head_dim": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),
}
FAMILIES = ["llama3_rope", "qwen2_untied", "qwen3_head_dim"]

FP32_TOLERANCE = 1e-4


def peer_model(case: str, seed: int = 0, head_scale: float = 1.0, **overrides):
    """A transformers model of `case` in eval mode with eager attention and seeded random weights.

    transformers initialises norm weights to 1 and biases to 0, which would hide a missing or
    misplaced norm or bias, so every parameter gets noise of std 0.1 (norm weights around 1).
    head_scale multiplies lm_head, which widens the gaps between logits for greedy decoding.
    """
    model_type, case_overrides = CASES[case]
    config = transformers.AutoConfig.for_model(model_type, **{**SMALL, **case_overrides, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.1
            p.copy_(1 + noise if name.endswith("norm.weight") else noise)
        if head_scale != 1.0:
            model.lm_head.weight.mul_(head_scale)
    return model.eval()


def peer_from_folder(folder, dtype=torch.float32):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    return model.eval()


def saved_peer(case: str, folder, **kwargs):
    """(transformers model, our model loaded from the folder it was saved to)."""
    peer = peer_model(case, **kwargs)
    peer.save_pretrained(folder)
    return peer, load_pretrained(folder).eval()


def random_ids(B: int, T: int, seed: int = 0, low: int = 0, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(low, high, (B, T), generator=torch.Generator().manual_seed(seed))


def max_difference(peer, ours, ids) -> float:
    with torch.no_grad():
        expected = peer(ids).logits  # (B, T, V)
        actual = ours(ids)
    assert actual.shape == expected.shape
    return (actual.float() - expected.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------
# Logits in fp32


@pytest.mark.parametrize("case", CASES)
def test_logits_match(case, tmp_path):
    peer, ours = saved_peer(case, tmp_path)
    difference = max_difference(peer, ours, random_ids(3, 40))
    assert difference <= FP32_TOLERANCE, f"max abs logit difference {difference:.2e}"


@pytest.mark.parametrize("kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
def test_grouped_query_logits_match(kv_heads, tmp_path):
    peer, ours = saved_peer("llama3_rope", tmp_path, num_key_value_heads=kv_heads)
    assert ours.model.layers[0].self_attn.k_proj.weight.shape == (kv_heads * 16, 64)
    difference = max_difference(peer, ours, random_ids(2, 24))
    assert difference <= FP32_TOLERANCE, f"max abs logit difference {difference:.2e}"


def test_loaded_config_fields(tmp_path):
    _, ours = saved_peer("llama3_rope", tmp_path)
    assert ours.config.rope_theta == 500000.0
    assert ours.config.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    _, qwen3 = saved_peer("qwen3_head_dim", tmp_path / "qwen3")
    assert qwen3.config.head_dim == 32
    assert qwen3.config.qk_norm is True
    assert qwen3.lm_head.weight is qwen3.model.embed_tokens.weight


def test_sharded_checkpoint_logits_match(tmp_path):
    peer = peer_model("qwen2_tied")
    peer.save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) >= 3
    assert not (tmp_path / WEIGHTS_NAME).exists()
    difference = max_difference(peer, load_pretrained(tmp_path).eval(), random_ids(2, 24))
    assert difference <= FP32_TOLERANCE, f"max abs logit difference {difference:.2e}"


@pytest.mark.parametrize("case", ["llama3_rope", "qwen2_tied"])
def test_pre_v5_config_layout(case, tmp_path):
    # Released checkpoints keep rope_theta and rope_scaling at the top level and use the key
    # torch_dtype. Both transformers 5 and our loader read that layout too.
    peer = peer_model(case)
    peer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope["rope_type"] != "default" else None
    config["torch_dtype"] = config.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = load_pretrained(tmp_path).eval()
    assert ours.config.rope_theta == config["rope_theta"]
    difference = max_difference(peer_from_folder(tmp_path), ours, random_ids(2, 24))
    assert difference <= FP32_TOLERANCE, f"max abs logit difference {difference:.2e}"


# ---------------------------------------------------------------------------------------------
# bf16

# Both sides round to bf16 (8 significant bits) after every matmul and residual add, but not at
# the same points: transformers' eager attention, for one, rounds its probabilities to bf16 before
# multiplying by V. With logits of magnitude 3 to 4 one bf16 step is 2**-6 = 0.016, and the two
# sides differed by at most 0.06 over 3 seeds of each family (torch 2.13 on an x86-64 CPU), so
# 0.125, 8 steps, leaves a margin.
BF16_TOLERANCE = 0.125


@pytest.mark.parametrize("case", FAMILIES)
def test_bf16_logits_match(case, tmp_path):
    peer_model(case).to(torch.bfloat16).save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path).eval()
    for name, p in ours.named_parameters():
        assert p.dtype == torch.bfloat16, name
    ids = random_ids(2, 24)
    with torch.no_grad():
        logits = ours(ids)
        peer_bf16 = peer_from_folder(tmp_path, torch.bfloat16)(ids).logits
        exact = peer_from_folder(tmp_path, torch.float32)(ids).logits  # the bf16 weights, computed in fp32
    assert logits.dtype == torch.bfloat16
    difference = (logits.float() - peer_bf16.float()).abs().max().item()
    assert difference <= BF16_TOLERANCE, f"max abs logit difference {difference:.3f}"
    # and our rounding error is of the same size as transformers' own
    our_error = (logits.float() - exact).abs().max().item()
    peer_error = (peer_bf16.float() - exact).abs().max().item()
    assert our_error <= 1.5 * peer_error, f"bf16 error {our_error:.3f}, transformers' {peer_error:.3f}"


# ---------------------------------------------------------------------------------------------
# Left padding and generation

PROMPT_LENGTHS = [3, 5, 8, 11, 13, 16, 20, 24]


def random_prompts(seed: int = 1) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def generation_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions (B, T) that transformers' generate derives from a left-padded attention mask."""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


@pytest.mark.parametrize("case", FAMILIES)
def test_left_padded_batch_logits_match(case, tmp_path):
    # Rope scores depend only on the distance between positions, so shifting a whole row's
    # positions changes its logits by rounding alone. What this test catches is padding that leaks
    # into the attention of real tokens.
    peer, ours = saved_peer(case, tmp_path)
    ids, mask = left_pad(random_prompts())
    with torch.no_grad():
        expected = peer(ids, attention_mask=mask, position_ids=generation_positions(mask)).logits
        actual = ours(ids, attention_mask=mask)
    real = mask.bool()  # padding positions have no defined output
    difference = (actual[real] - expected[real]).abs().max().item()
    assert difference <= FP32_TOLERANCE, f"max abs logit difference {difference:.2e}"


@pytest.mark.parametrize("case", FAMILIES)
def test_greedy_generation_matches(case, tmp_path):
    peer, ours = saved_peer(case, tmp_path, head_scale=5.0)
    prompts = random_prompts()
    ids, mask = left_pad(prompts)
    settings = transformers.GenerationConfig(do_sample=False, max_new_tokens=32, pad_token_id=0,
                                             eos_token_id=None)
    with torch.no_grad():
        expected = peer.generate(input_ids=ids, attention_mask=mask, generation_config=settings)
    expected = expected[:, ids.shape[1]:].tolist()  # (B, 32) new tokens
    result = generate(ours, prompts, max_new_tokens=32, stop_ids=[], pad_id=0, temperature=0.0)
    assert len({tuple(row) for row in expected}) == len(prompts), "rows should differ"
    for row, prompt in enumerate(prompts):
        assert len(expected[row]) == 32
        assert result.tokens[row] == expected[row], f"prompt {row} ({len(prompt)} ids)"


# ---------------------------------------------------------------------------------------------
# Export: a checkpoint we save after adding the PCL tokens loads in transformers

# (case, tokenizer style, extra embedding rows beyond the tokenizer's ids)
EXPORTS = {
    "llama3": ("llama3_rope", "llama3", 0),
    "qwen2_padded_rows": ("qwen2_tied", "qwen2", 16),  # Qwen pads its embedding matrix
    "qwen3": ("qwen3_head_dim", "qwen3", 0),
}


def exported(name: str, tmp_path):
    """Export a transformers checkpoint with a released-style tokenizer through our code.

    Returns (our model, our tokenizer, folder written by our save_pretrained).
    """
    case, style, extra_rows = EXPORTS[name]
    base = write_hf_style_tokenizer(tmp_path / "base", style, vocab_size=VOCAB)
    base_size = HFTokenizer.from_file(str(base / "tokenizer.json")).get_vocab_size()
    peer_model(case, vocab_size=base_size + extra_rows).save_pretrained(base)

    tokenizer = Tokenizer.from_folder(base)
    model = load_pretrained(base).eval()
    if tokenizer.max_id >= model.config.vocab_size:
        model.resize_token_embeddings(tokenizer.max_id + 1)
    save_pretrained(model, tokenizer, tmp_path / "export")
    return model, tokenizer, tmp_path / "export"


@pytest.mark.parametrize("name", EXPORTS)
def test_export_logits_match(name, tmp_path):
    model, tokenizer, folder = exported(name, tmp_path)
    _, _, extra_rows = EXPORTS[name]
    # the PCL tokens take padding rows where there are enough of them, else the matrix grows
    assert model.config.vocab_size == max(tokenizer.vocab_size, VOCAB + extra_rows)
    peer = peer_from_folder(folder)
    assert peer.config.vocab_size == model.config.vocab_size
    assert peer.config.architectures == [model.config.architecture]
    # ids across the whole vocabulary, the new PCL rows included
    ids = torch.cat([random_ids(2, 20, high=model.config.vocab_size),
                     torch.tensor([tokenizer.token_id(t) for t in PCL_TOKENS[:8]]).view(2, 4)], dim=1)
    difference = max_difference(peer, model, ids)
    assert difference <= FP32_TOLERANCE, f"max abs logit difference {difference:.2e}"


@pytest.mark.parametrize("name", EXPORTS)
def test_export_tokenizer_loads(name, tmp_path):
    _, tokenizer, folder = exported(name, tmp_path)
    text = "Ann has 12 apples.<think>12 + 7 = 19.</think><answer>19</answer><post-completion>"
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert fast.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert len(fast) == tokenizer.vocab_size
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    assert auto.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert auto.eos_token_id == tokenizer.eos_id
    assert auto.pad_token_id == tokenizer.pad_id
    for token in PCL_TOKENS:
        assert auto.convert_tokens_to_ids(token) == tokenizer.token_id(token), token


@pytest.mark.parametrize("name", EXPORTS)
def test_export_generation_stops_at_marker(name, tmp_path):
    model, tokenizer, folder = exported(name, tmp_path)
    settings = transformers.GenerationConfig.from_pretrained(folder)
    assert tokenizer.marker_id in settings.eos_token_id
    assert tokenizer.eos_id in settings.eos_token_id

    # Make the marker the first greedy token: its lm_head row becomes twice the row of the token
    # that greedy decoding picks, so its logit doubles that maximum (positive here).
    prompt = random_ids(1, 6, seed=3, high=tokenizer.eos_id)[0].tolist()
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1]
        assert logits.max() > 0
        model.lm_head.weight[tokenizer.marker_id] = 2 * model.lm_head.weight[logits.argmax()]
    save_pretrained(model, tokenizer, folder)
    peer = peer_from_folder(folder)
    with torch.no_grad():
        output = peer.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8)
    assert output[0, len(prompt):].tolist() == [tokenizer.marker_id]


def test_export_sharded_loads(tmp_path):
    peer = peer_model("qwen3_head_dim")
    peer.save_pretrained(tmp_path / "base")
    ours = load_pretrained(tmp_path / "base").eval()
    save_pretrained(ours, None, tmp_path / "export", max_shard_bytes=60_000)
    assert (tmp_path / "export" / INDEX_NAME).is_file()
    difference = max_difference(peer_from_folder(tmp_path / "export"), ours, random_ids(2, 24))
    assert difference <= FP32_TOLERANCE, f"max abs logit difference {difference:.2e}"


# ---------------------------------------------------------------------------------------------
# Errors on checkpoints written by transformers


def test_unsupported_architecture_rejected(tmp_path):
    config = transformers.MistralConfig(**SMALL)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config\.json: field 'architectures': unsupported architecture "
                                         r"'MistralForCausalLM'; supported: LlamaForCausalLM, Qwen2ForCausalLM"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("case, overrides, message", [
    ("llama3_rope", dict(mlp_bias=True), "mlp_bias true"),
    ("qwen2_tied", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
     "sliding-window attention"),
], ids=["mlp_bias", "sliding_window"])
def test_unsupported_setting_rejected(case, overrides, message, tmp_path):
    peer_model(case, **overrides).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"unsupported settings: {message}"):
        load_pretrained(tmp_path)


def test_missing_weight_rejected(tmp_path):
    peer_model("qwen3_head_dim").save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    del state["model.layers.1.self_attn.k_norm.weight"]
    save_file(state, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \(1\): \['model\.layers\.1\.self_attn\.k_norm\.weight'\]"):
        load_pretrained(tmp_path)


def test_unexpected_weight_rejected(tmp_path):
    # a Qwen2 checkpoint whose config.json claims Llama: the q/k/v biases are unexpected
    peer_model("qwen2_untied").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected \(6\): \['model\.layers\.0\.self_attn\.k_proj\.bias'"):
        load_pretrained(tmp_path)


def test_config_from_peer_config_dict():
    # from_hf also reads the dict that a transformers 5 config returns from to_dict()
    config = transformers.AutoConfig.for_model("llama", **SMALL, rope_parameters=LLAMA3_ROPE)
    ours = ModelConfig.from_hf(config.to_dict())
    assert ours.rope_theta == 500000.0
    assert ours.rope_scaling["rope_type"] == "llama3"
    assert ours.num_key_value_heads == 2

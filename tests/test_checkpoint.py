import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.checkpoint import INDEX_NAME, WEIGHTS_NAME, check_tokenizer_fits, load_pretrained, save_pretrained
from model.config import ModelConfig
from model.tokenizer import Tokenizer, train_tokenizer

IDS = torch.tensor([[1, 5, 9, 2, 7, 3], [4, 4, 8, 0, 6, 2]])


def logits_of(model):
    with torch.no_grad():
        return model(IDS)


def saved_model(make_model, tok, folder, **overrides):
    model = make_model(vocab_size=tok.vocab_size, **overrides)
    save_pretrained(model, tok, folder)
    return model


CONFIGS = {
    "untied": dict(),
    "tied": dict(tie_word_embeddings=True),
    "qwen2": dict(architecture="Qwen2ForCausalLM", attention_bias=True),
    "qwen3": dict(architecture="Qwen3ForCausalLM", qk_norm=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_logits(make_model, tok, tmp_path, name):
    model = saved_model(make_model, tok, tmp_path, **CONFIGS[name])
    loaded = load_pretrained(tmp_path).eval()
    assert torch.equal(logits_of(loaded), logits_of(model))


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_state_dict(make_model, tok, tmp_path, name):
    model = saved_model(make_model, tok, tmp_path, **CONFIGS[name])
    loaded = load_pretrained(tmp_path)
    expected = model.state_dict()
    actual = loaded.state_dict()
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_config(make_model, tok, tmp_path, name):
    model = saved_model(make_model, tok, tmp_path, **CONFIGS[name])
    loaded = load_pretrained(tmp_path)
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "head_dim", "architecture",
                "attention_bias", "qk_norm", "tie_word_embeddings", "rope_theta"):
        assert getattr(loaded.config, key) == getattr(model.config, key), key


def test_load_tied_stays_tied(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path, tie_word_embeddings=True)
    loaded = load_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_tied_stored_once(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path, tie_word_embeddings=True)
    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys
    assert "model.embed_tokens.weight" in keys


def test_untied_stores_lm_head(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path)
    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as f:
        assert "lm_head.weight" in set(f.keys())


def test_load_rebuilds_rope_buffer(make_model, tok, tmp_path):
    model = saved_model(make_model, tok, tmp_path, rope_theta=321.0)
    loaded = load_pretrained(tmp_path)
    assert loaded.inv_freq.device.type == "cpu"
    assert torch.equal(loaded.inv_freq, model.inv_freq)


def test_load_no_meta_tensors(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path)
    loaded = load_pretrained(tmp_path)
    for name, tensor in [*loaded.named_parameters(), *loaded.named_buffers()]:
        assert not tensor.is_meta, name


# ---------------------------------------------------------------------------------------------
# Shards


def test_sharded_files(make_model, tok, tmp_path):
    model = make_model(vocab_size=tok.vocab_size)
    save_pretrained(model, tok, tmp_path, max_shard_bytes=20_000)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert (tmp_path / INDEX_NAME).is_file()
    assert not (tmp_path / WEIGHTS_NAME).exists()
    assert len(shards) >= 3
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert index["metadata"]["total_size"] == total


def test_sharded_index_matches_shards(make_model, tok, tmp_path):
    model = make_model(vocab_size=tok.vocab_size)
    save_pretrained(model, tok, tmp_path, max_shard_bytes=20_000)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    for name, shard in index["weight_map"].items():
        with safe_open(tmp_path / shard, framework="pt") as f:
            assert name in set(f.keys()), name


def test_sharded_round_trip(make_model, tok, tmp_path):
    model = make_model(vocab_size=tok.vocab_size, tie_word_embeddings=True)
    save_pretrained(model, tok, tmp_path, max_shard_bytes=20_000)
    loaded = load_pretrained(tmp_path).eval()
    assert torch.equal(logits_of(loaded), logits_of(model))


def test_unsharded_save_replaces_index(make_model, tok, tmp_path):
    first = make_model(vocab_size=tok.vocab_size, seed=1)
    save_pretrained(first, tok, tmp_path, max_shard_bytes=20_000)
    second = make_model(vocab_size=tok.vocab_size, seed=2)
    save_pretrained(second, tok, tmp_path)
    assert not (tmp_path / INDEX_NAME).exists()
    assert torch.equal(logits_of(load_pretrained(tmp_path)), logits_of(second))


def test_sharded_save_replaces_single_file(make_model, tok, tmp_path):
    first = make_model(vocab_size=tok.vocab_size, seed=1)
    save_pretrained(first, tok, tmp_path)
    second = make_model(vocab_size=tok.vocab_size, seed=2)
    save_pretrained(second, tok, tmp_path, max_shard_bytes=20_000)
    assert not (tmp_path / WEIGHTS_NAME).exists()
    assert torch.equal(logits_of(load_pretrained(tmp_path)), logits_of(second))


# ---------------------------------------------------------------------------------------------
# dtype


def test_bf16_dtype_kept(make_model, tok, tmp_path):
    model = make_model(vocab_size=tok.vocab_size).to(torch.bfloat16)
    save_pretrained(model, tok, tmp_path)
    loaded = load_pretrained(tmp_path)
    for name, p in loaded.named_parameters():
        assert p.dtype == torch.bfloat16, name


def test_bf16_values_kept(make_model, tok, tmp_path):
    # compares weights, not logits, because Module.to(bfloat16) also rounds the rope buffer, which a
    # loaded model rebuilds in fp32 (test_bf16_cast_keeps_rope_fp32 in test_transformer.py)
    model = make_model(vocab_size=tok.vocab_size).to(torch.bfloat16)
    save_pretrained(model, tok, tmp_path)
    loaded = load_pretrained(tmp_path)
    for name, p in model.named_parameters():
        assert torch.equal(loaded.get_parameter(name), p), name


def test_bf16_load_logits(make_model, tok, tmp_path):
    # a float32 checkpoint loaded as bfloat16 equals the same weights cast after an fp32 load
    model = make_model(vocab_size=tok.vocab_size)
    save_pretrained(model, tok, tmp_path)
    loaded = load_pretrained(tmp_path, dtype=torch.bfloat16)
    cast = load_pretrained(tmp_path)
    for p in cast.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert torch.equal(logits_of(loaded), logits_of(cast))


def test_bf16_config_torch_dtype(make_model, tok, tmp_path):
    save_pretrained(make_model(vocab_size=tok.vocab_size).to(torch.bfloat16), tok, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert config["dtype"] == "bfloat16"


def test_cast_replaces_loaded_dtype_key(make_model, tok, tmp_path):
    # from_hf keeps the "dtype" of a transformers 5 config.json in extra. After a cast, the saved
    # file must name the new dtype, because transformers 5 reads "dtype" first.
    save_pretrained(make_model(vocab_size=tok.vocab_size).to(torch.bfloat16), tok, tmp_path / "bf16")
    loaded = load_pretrained(tmp_path / "bf16", dtype=torch.float32)
    assert loaded.config.extra["dtype"] == "bfloat16"
    save_pretrained(loaded, tok, tmp_path / "fp32")
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert config["torch_dtype"] == "float32"


def test_load_dtype_override(make_model, tok, tmp_path):
    model = make_model(vocab_size=tok.vocab_size).to(torch.bfloat16)
    save_pretrained(model, tok, tmp_path)
    loaded = load_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.lm_head.weight.dtype == torch.float32
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight.float())


# ---------------------------------------------------------------------------------------------
# Side files


def test_generation_config_stop_ids(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path)
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eos_id, tok.marker_id]
    assert generation["pad_token_id"] == tok.pad_id


def test_config_json_fields(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path, architecture="Qwen3ForCausalLM", qk_norm=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["model_type"] == "qwen3"
    assert config["eos_token_id"] == tok.eos_id
    assert config["pad_token_id"] == tok.pad_id
    assert config["vocab_size"] == tok.vocab_size
    assert config["torch_dtype"] == "float32"


def test_tokenizer_saved(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path)
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.encode("<think>12 + 7</think>") == tok.encode("<think>12 + 7</think>")


def test_save_without_tokenizer(make_model, tmp_path):
    model = make_model()
    save_pretrained(model, None, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    assert torch.equal(logits_of(load_pretrained(tmp_path)), logits_of(model))


def test_save_compiled_wrapper_names(make_model, tok, tmp_path):
    # torch.compile builds nothing until the first call, so wrapping is cheap here
    model = make_model(vocab_size=tok.vocab_size)
    save_pretrained(torch.compile(model), tok, tmp_path)
    with safe_open(tmp_path / WEIGHTS_NAME, framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(model.state_dict())


def test_no_tmp_files_left(make_model, tok, tmp_path):
    model = make_model(vocab_size=tok.vocab_size)
    save_pretrained(model, tok, tmp_path / "single")
    save_pretrained(model, tok, tmp_path / "sharded", max_shard_bytes=20_000)
    assert list(tmp_path.rglob("*.tmp")) == []


# ---------------------------------------------------------------------------------------------
# Errors


def test_truncated_weights(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path)
    path = tmp_path / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read weights"):
        load_pretrained(tmp_path)


def test_truncated_shard(make_model, tok, tmp_path):
    save_pretrained(make_model(vocab_size=tok.vocab_size), tok, tmp_path, max_shard_bytes=20_000)
    path = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=path.name):
        load_pretrained(tmp_path)


def test_missing_config(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load_pretrained(tmp_path)


def test_missing_weights(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_pretrained(tmp_path)


def test_weights_config_mismatch(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weights do not match config\.json .*: missing \(9\): \['model\.layers\.2\."):
        load_pretrained(tmp_path)


def test_missing_weight_named(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"missing \(1\): \['model\.layers\.1\.mlp\.up_proj\.weight'\]$"):
        load_pretrained(tmp_path)


def test_unexpected_weight_named(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2, 2)
    save_file(state, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"unexpected \(1\): \['model\.layers\.0\.mlp\.extra_proj\.weight'\]$"):
        load_pretrained(tmp_path)


def test_stored_rope_buffer_ignored(make_model, tok, tmp_path):
    # older exports stored each layer's rotary_emb.inv_freq, which the loader rebuilds from config.json
    model = saved_model(make_model, tok, tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    save_file(state, tmp_path / WEIGHTS_NAME)
    assert torch.equal(logits_of(load_pretrained(tmp_path)), logits_of(model))


def test_unsupported_architecture_folder(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported architecture 'MistralForCausalLM'; supported: LlamaForCausalLM"):
        load_pretrained(tmp_path)


def test_save_tokenizer_too_large(make_model, tok, tmp_path):
    model = make_model(vocab_size=tok.vocab_size - 3)
    with pytest.raises(ValueError, match=rf"ids up to {tok.vocab_size - 1} but the embedding matrix has "
                                         rf"{tok.vocab_size - 3} rows; call model\.resize_token_embeddings"):
        save_pretrained(model, tok, tmp_path)
    assert not tmp_path.joinpath(WEIGHTS_NAME).exists()


def test_tokenizer_smaller_than_embeddings(make_model, tok):
    # Qwen pads its embedding matrix beyond the tokenizer's ids, which is valid
    check_tokenizer_fits(make_model(vocab_size=tok.vocab_size + 50), tok)


def test_tokenizer_fits_after_resize(make_model):
    tokenizer = train_tokenizer(["a b c 1 2"], vocab_size=280)
    model = make_model(vocab_size=tokenizer.vocab_size - len(tokenizer.added_ids))
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        check_tokenizer_fits(model, tokenizer)
    model.resize_token_embeddings(tokenizer.vocab_size)
    check_tokenizer_fits(model, tokenizer)


def test_unexpected_weights(make_model, tok, tmp_path):
    saved_model(make_model, tok, tmp_path, architecture="Qwen2ForCausalLM", attention_bias=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected \(6\): \[.*q_proj\.bias"):
        load_pretrained(tmp_path)


def test_load_from_config_dict_shape(tok, tmp_path):
    # a config built by from_hf, not from a preset, saves and loads too
    config = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "vocab_size": tok.vocab_size,
                                  "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "num_key_value_heads": 1})
    from model.transformer import Transformer
    model = Transformer(config)
    model.init_weights(seed=0)
    save_pretrained(model, tok, tmp_path)
    assert torch.equal(logits_of(load_pretrained(tmp_path)), logits_of(model))

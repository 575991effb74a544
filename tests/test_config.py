import json
from dataclasses import fields

import pytest

from model.config import PRESETS, ModelConfig
from model.transformer import Transformer

# Minimal HF config.json dicts of each supported family. The family-specific keys are left out, so
# the family defaults apply.
LLAMA_HF = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": [2, 3],
    "hidden_act": "silu",
    "torch_dtype": "bfloat16",
}
QWEN2_HF = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 1200,
    "hidden_size": 96,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "sliding_window": 4096,
}
QWEN3_HF = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 900,
    "hidden_size": 64,
    "intermediate_size": 192,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "tie_word_embeddings": True,
}


# The layout that transformers 5 writes: theta and scaling in one rope_parameters dict, "dtype" in place
# of "torch_dtype".
LLAMA_HF_V5 = {
    **{k: v for k, v in LLAMA_HF.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")},
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "dtype": "bfloat16",
}


def count_parameters(config: ModelConfig) -> int:
    # parameters() yields a tied weight once, as num_parameters() should count it
    return sum(p.numel() for p in Transformer(config).parameters())


# ---------------------------------------------------------------------------------------------
# Presets


def test_from_preset_tiny():
    config = ModelConfig.from_preset("tiny")
    for key, value in PRESETS["tiny"].items():
        assert getattr(config, key) == value, key


def test_from_preset_overrides():
    config = ModelConfig.from_preset("small", vocab_size=777, tie_word_embeddings=False)
    assert config.vocab_size == 777
    assert config.tie_word_embeddings is False
    assert config.hidden_size == PRESETS["small"]["hidden_size"]


def test_from_preset_unknown():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        ModelConfig.from_preset("huge")


def test_head_dim_derived():
    config = ModelConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=3)
    assert config.head_dim == 16


def test_head_dim_explicit_kept():
    config = ModelConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    assert config.head_dim == 32


def test_head_dim_indivisible_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(hidden_size=30, num_attention_heads=4, num_key_value_heads=2)


def test_kv_heads_not_divisor_rejected():
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        ModelConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=4)


def test_rope_scaling_unknown_rejected():
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        ModelConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})


# ---------------------------------------------------------------------------------------------
# from_hf


def test_from_hf_llama_dict():
    config = ModelConfig.from_hf(LLAMA_HF)
    assert config.architecture == "LlamaForCausalLM"
    assert config.hidden_size == 64
    assert config.num_key_value_heads == 2
    assert config.head_dim == 8
    assert config.rope_theta == 500000.0
    assert config.rope_scaling["factor"] == 8.0
    assert config.eos_token_id == [2, 3]
    assert config.attention_bias is False
    assert config.qk_norm is False


def test_from_hf_unknown_keys_kept():
    config = ModelConfig.from_hf(LLAMA_HF)
    assert config.extra["hidden_act"] == "silu"
    assert config.extra["torch_dtype"] == "bfloat16"
    assert "architectures" not in config.extra


def test_from_hf_does_not_mutate_input():
    source = json.loads(json.dumps(LLAMA_HF))
    ModelConfig.from_hf(source)
    assert source == LLAMA_HF


def test_from_hf_qwen2_bias_default():
    config = ModelConfig.from_hf(QWEN2_HF)
    assert config.architecture == "Qwen2ForCausalLM"
    assert config.attention_bias is True
    assert config.qk_norm is False
    assert config.tie_word_embeddings is True
    assert config.extra["sliding_window"] == 4096


def test_from_hf_qwen3_qk_norm():
    config = ModelConfig.from_hf(QWEN3_HF)
    assert config.architecture == "Qwen3ForCausalLM"
    assert config.qk_norm is True
    assert config.attention_bias is False
    assert config.head_dim == 32


def test_from_hf_explicit_bias_wins():
    config = ModelConfig.from_hf({**QWEN3_HF, "attention_bias": True})
    assert config.attention_bias is True


def test_from_hf_missing_architectures_is_llama():
    hf = {k: v for k, v in LLAMA_HF.items() if k != "architectures"}
    assert ModelConfig.from_hf(hf).architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("hf", [LLAMA_HF, QWEN2_HF, QWEN3_HF], ids=["llama", "qwen2", "qwen3"])
def test_from_hf_folder_and_file(tmp_path, hf):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    from_dict = ModelConfig.from_hf(hf)
    assert ModelConfig.from_hf(tmp_path) == from_dict
    assert ModelConfig.from_hf(tmp_path / "config.json") == from_dict
    assert ModelConfig.from_hf(str(tmp_path)) == from_dict


def test_from_hf_folder_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        ModelConfig.from_hf(tmp_path)


def test_from_hf_unsupported_architecture():
    hf = {**LLAMA_HF, "architectures": ["MistralForCausalLM"]}
    with pytest.raises(ValueError) as info:
        ModelConfig.from_hf(hf)
    message = str(info.value)
    assert "'architectures'" in message
    assert "MistralForCausalLM" in message
    assert "LlamaForCausalLM" in message


def test_from_hf_unsupported_architecture_names_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**QWEN3_HF, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"config\.json: field 'architectures'"):
        ModelConfig.from_hf(tmp_path)


# ---------------------------------------------------------------------------------------------
# from_hf: rope layouts, omitted fields, unsupported settings


def test_from_hf_rope_parameters_layout():
    old, new = ModelConfig.from_hf(LLAMA_HF), ModelConfig.from_hf(LLAMA_HF_V5)
    assert new.rope_theta == 500000.0
    assert new.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for f in fields(ModelConfig):
        if f.name != "extra":
            assert getattr(new, f.name) == getattr(old, f.name), f.name


def test_from_hf_rope_parameters_not_in_extra():
    # to_hf writes rope_theta and rope_scaling, so a copy in extra would be written twice
    config = ModelConfig.from_hf(LLAMA_HF_V5)
    assert "rope_parameters" not in config.extra
    assert "rope_parameters" not in config.to_hf()


def test_from_hf_rope_parameters_default_type():
    hf = {**QWEN2_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}
    del hf["rope_theta"]
    config = ModelConfig.from_hf(hf)
    assert config.rope_theta == 1000000.0
    assert config.rope_scaling is None


def test_from_hf_rope_theta_inside_dict_wins():
    hf = {**QWEN2_HF, "rope_theta": 5.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}
    assert ModelConfig.from_hf(hf).rope_theta == 7.0


def test_from_hf_rope_scaling_wins_over_parameters():
    # transformers 5.25 reads a non-empty rope_scaling first
    hf = {**LLAMA_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}
    config = ModelConfig.from_hf(hf)
    assert config.rope_scaling["rope_type"] == "llama3"
    assert config.rope_theta == 500000.0


def test_from_hf_rope_null_scaling():
    config = ModelConfig.from_hf({**QWEN2_HF, "rope_scaling": None})
    assert config.rope_scaling is None
    assert config.rope_theta == 1000000.0


def test_from_hf_llama3_original_context_default():
    scaling = {k: v for k, v in LLAMA_HF["rope_scaling"].items() if k != "original_max_position_embeddings"}
    config = ModelConfig.from_hf({**LLAMA_HF, "rope_scaling": scaling})
    assert config.rope_scaling["original_max_position_embeddings"] == LLAMA_HF["max_position_embeddings"]


def test_from_hf_rope_per_layer_type_rejected():
    hf = {**QWEN3_HF, "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    with pytest.raises(ValueError, match="rope parameters per layer type are not supported"):
        ModelConfig.from_hf(hf)


def test_from_hf_partial_rotary_rejected():
    hf = {**QWEN3_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}}
    with pytest.raises(ValueError, match="partial_rotary_factor 0.5 is not supported"):
        ModelConfig.from_hf(hf)


def test_from_hf_missing_kv_heads_llama():
    hf = {k: v for k, v in LLAMA_HF.items() if k != "num_key_value_heads"}
    assert ModelConfig.from_hf(hf).num_key_value_heads == LLAMA_HF["num_attention_heads"]


def test_from_hf_null_kv_heads():
    config = ModelConfig.from_hf({**QWEN2_HF, "num_key_value_heads": None})
    assert config.num_key_value_heads == QWEN2_HF["num_attention_heads"]


def test_from_hf_missing_kv_heads_qwen():
    # Qwen2Config and Qwen3Config default to 32 key/value heads when the key is absent
    hf = {k: v for k, v in QWEN2_HF.items() if k != "num_key_value_heads"}
    assert ModelConfig.from_hf({**hf, "num_attention_heads": 32, "hidden_size": 128}).num_key_value_heads == 32


def test_from_hf_missing_head_dim_qwen3():
    hf = {k: v for k, v in QWEN3_HF.items() if k != "head_dim"}
    assert ModelConfig.from_hf(hf).head_dim == 128


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"mlp_bias": True}, "mlp_bias true"),
    ({"use_sliding_window": True}, "sliding-window attention"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding-window attention"),
], ids=["hidden_act", "mlp_bias", "use_sliding_window", "layer_types"])
def test_from_hf_unsupported_setting(change, message):
    with pytest.raises(ValueError, match=f"config dict: unsupported settings: {message}"):
        ModelConfig.from_hf({**QWEN2_HF, **change})


def test_from_hf_full_attention_layer_types_accepted():
    # transformers 5 writes layer_types for every Qwen config, all full_attention unless sliding
    config = ModelConfig.from_hf({**QWEN2_HF, "use_sliding_window": False,
                                  "layer_types": ["full_attention", "full_attention"]})
    assert config.architecture == "Qwen2ForCausalLM"


def test_o_proj_bias_by_family():
    assert ModelConfig(attention_bias=True).o_proj_bias is True
    assert ModelConfig(architecture="Qwen3ForCausalLM", attention_bias=True).o_proj_bias is True
    assert ModelConfig(architecture="Qwen2ForCausalLM", attention_bias=True).o_proj_bias is False
    assert ModelConfig(attention_bias=False).o_proj_bias is False


# ---------------------------------------------------------------------------------------------
# to_hf


def test_to_hf_family_fields():
    hf = ModelConfig(architecture="Qwen2ForCausalLM", attention_bias=True).to_hf()
    assert hf["architectures"] == ["Qwen2ForCausalLM"]
    assert hf["model_type"] == "qwen2"
    assert "attention_bias" not in hf
    assert hf["hidden_act"] == "silu"
    assert "qk_norm" not in hf
    assert "extra" not in hf


def test_to_hf_is_json():
    hf = ModelConfig.from_hf(LLAMA_HF).to_hf()
    assert json.loads(json.dumps(hf)) == hf


ROUND_TRIP_CONFIGS = {
    "llama": ModelConfig(vocab_size=321, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=3, head_dim=12,
                         max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=123456.0,
                         rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                         attention_bias=True, tie_word_embeddings=True, bos_token_id=5,
                         eos_token_id=[6, 7], pad_token_id=8),
    "qwen2": ModelConfig(architecture="Qwen2ForCausalLM", attention_bias=True, eos_token_id=3),
    "qwen3": ModelConfig(architecture="Qwen3ForCausalLM", qk_norm=True, head_dim=64,
                         tie_word_embeddings=True),
    "extra": ModelConfig(extra={"sliding_window": 4096, "use_cache": True}),
}


@pytest.mark.parametrize("name", ROUND_TRIP_CONFIGS)
def test_to_hf_round_trip(name):
    config = ROUND_TRIP_CONFIGS[name]
    loaded = ModelConfig.from_hf(json.loads(json.dumps(config.to_hf())))
    for f in fields(ModelConfig):
        if f.name == "extra":
            continue
        assert getattr(loaded, f.name) == getattr(config, f.name), f.name


@pytest.mark.parametrize("name", ROUND_TRIP_CONFIGS)
def test_to_hf_round_trip_extra(name):
    # from_hf keeps the keys it does not know (model_type, hidden_act) in extra, and to_hf rewrites them
    config = ROUND_TRIP_CONFIGS[name]
    loaded = ModelConfig.from_hf(config.to_hf())
    for key, value in config.extra.items():
        assert loaded.extra[key] == value, key
    assert loaded.to_hf() == config.to_hf()


def test_to_hf_round_trip_llama_qk_norm():
    config = ModelConfig.from_preset("tiny", qk_norm=True)
    assert ModelConfig.from_hf(config.to_hf()).qk_norm is True


# ---------------------------------------------------------------------------------------------
# num_parameters


NUM_PARAMETER_CONFIGS = {
    "tiny": ModelConfig.from_preset("tiny"),
    "tiny_tied": ModelConfig.from_preset("tiny", tie_word_embeddings=True),
    "bias": ModelConfig.from_preset("tiny", attention_bias=True),
    "qk_norm": ModelConfig.from_preset("tiny", architecture="Qwen3ForCausalLM", qk_norm=True),
    "head_dim": ModelConfig.from_preset("tiny", head_dim=16, num_key_value_heads=1),
    "qwen2_tied": ModelConfig.from_hf(QWEN2_HF),
    "qwen3": ModelConfig.from_hf({**QWEN3_HF, "tie_word_embeddings": False}),
    "qwen3_bias": ModelConfig.from_hf({**QWEN3_HF, "attention_bias": True}),
}


@pytest.mark.parametrize("name", NUM_PARAMETER_CONFIGS)
def test_num_parameters_matches_model(name):
    config = NUM_PARAMETER_CONFIGS[name]
    assert config.num_parameters() == count_parameters(config)


def test_num_parameters_tied_difference():
    untied = ModelConfig.from_preset("tiny", vocab_size=300)
    tied = ModelConfig.from_preset("tiny", vocab_size=300, tie_word_embeddings=True)
    assert untied.num_parameters() - tied.num_parameters() == 300 * untied.hidden_size

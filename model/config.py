"""Model configuration: one dataclass for the Llama / Qwen2 / Qwen3 families.

Family differences are fields, not subclasses: q/k/v bias (Qwen2), q/k RMSNorm (Qwen3),
tied embeddings, rope theta and llama3 rope scaling.
"""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

# Architectures we can load, with the family-specific defaults that their HF config.json may omit.
# `defaults` holds the values that transformers 5.25 uses for shape fields missing from config.json.
ARCHITECTURES = {
    "LlamaForCausalLM": dict(model_type="llama", attention_bias=False, qk_norm=False,
                             defaults=dict(num_key_value_heads=None)),
    "Qwen2ForCausalLM": dict(model_type="qwen2", attention_bias=True, qk_norm=False,
                             defaults=dict(num_key_value_heads=32)),
    "Qwen3ForCausalLM": dict(model_type="qwen3", attention_bias=False, qk_norm=True,
                             defaults=dict(num_key_value_heads=32, head_dim=128)),
}


@dataclass
class ModelConfig:
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF "rope_scaling"; only rope_type "llama3" is supported
    # bias on q/k/v (Qwen2 always has it), and on o_proj too in Llama and Qwen3, as in transformers
    attention_bias: bool = False
    qk_norm: bool = False  # RMSNorm on each head of q and k before rope (Qwen3)
    tie_word_embeddings: bool = False
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # unknown HF keys, written back unchanged on save

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(ARCHITECTURES)}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ("llama3", "default"):
                raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: llama3")

    @classmethod
    def from_hf(cls, source: str | Path | dict) -> "ModelConfig":
        """Build from an HF config.json (a path to the file or its folder, or the parsed dict)."""
        if isinstance(source, dict):
            hf, where = dict(source), "config dict"
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: config.json not found; expected an HF model folder, which contains "
                                        "config.json")
            where = str(path)
            try:
                with open(path, encoding="utf-8") as f:
                    hf = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: invalid JSON ({e}); restore the model's config.json") from None
            if not isinstance(hf, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(hf).__name__}; "
                                 "restore the model's config.json")
        architectures = hf.pop("architectures", None) or ["LlamaForCausalLM"]
        architecture = architectures[0]
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"{where}: field 'architectures': unsupported architecture {architecture!r}; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        check_supported(hf, where)
        rope_parameters = hf.pop("rope_parameters", None)
        known = {f.name for f in fields(cls)} - {"architecture", "extra"}
        kwargs = {k: hf.pop(k) for k in list(hf) if k in known}
        check_field_types(kwargs, where)
        kwargs.update(rope_fields(kwargs, rope_parameters, where))
        family = ARCHITECTURES[architecture]
        kwargs.setdefault("attention_bias", family["attention_bias"])
        kwargs.setdefault("qk_norm", family["qk_norm"])
        for key, value in family["defaults"].items():
            kwargs.setdefault(key, value)
        if kwargs.get("num_key_value_heads") is None:  # null: one key/value head per query head
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        return cls(**kwargs, architecture=architecture, extra=hf)

    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias and self.architecture != "Qwen2ForCausalLM"

    def to_hf(self) -> dict:
        """Return the HF config.json dict for this configuration."""
        hf = dict(self.extra)
        hf.update({k: v for k, v in asdict(self).items() if k not in ("architecture", "extra", "qk_norm")})
        if self.qk_norm != ARCHITECTURES[self.architecture]["qk_norm"]:
            # NOTE: an ablation outside the HF families; transformers ignores this key
            hf["qk_norm"] = self.qk_norm
        hf["architectures"] = [self.architecture]
        hf["model_type"] = ARCHITECTURES[self.architecture]["model_type"]
        if hf["model_type"] == "qwen2":
            hf.pop("attention_bias")  # Qwen2 always has q/k/v bias; its config has no such field
        hf.setdefault("hidden_act", "silu")
        return hf

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def num_parameters(self) -> int:
        D, H, K, Dh, F = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                          self.head_dim, self.intermediate_size)
        attention = D * H * Dh * 2 + D * K * Dh * 2 + (H * Dh + 2 * K * Dh) * self.attention_bias
        attention += D * self.o_proj_bias
        block = attention + 3 * D * F + 2 * D + 2 * Dh * self.qk_norm
        embeddings = self.vocab_size * D * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * block + embeddings + D


def check_field_types(values: dict, where: str):
    """Raise ValueError naming the field when a number field of config.json has a value of another type."""
    for f in fields(ModelConfig):
        if f.name not in values or f.type not in (int, float):
            continue
        value = values[f.name]
        if value is None and f.name == "num_key_value_heads":
            continue  # null: one key/value head per query head, resolved by from_hf
        allowed = (int,) if f.type is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, allowed):
            raise ValueError(f"{where}: field {f.name!r} must be {'an integer' if f.type is int else 'a number'}, "
                             f"got {value!r}; fix config.json")


def check_supported(hf: dict, where: str):
    """Raise ValueError for config.json settings of the supported families that our Transformer
    does not implement, so that they fail at load time rather than give different logits."""
    unsupported = []
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {hf['hidden_act']!r} (only 'silu' is implemented)")
    if hf.get("mlp_bias"):
        unsupported.append("mlp_bias true (MLP projections have no bias here)")
    layer_types = hf.get("layer_types") or []
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in layer_types):
        unsupported.append("sliding-window attention (use_sliding_window or layer_types)")
    if unsupported:
        raise ValueError(f"{where}: unsupported settings: {'; '.join(unsupported)}")


def rope_fields(kwargs: dict, rope_parameters: dict | None, where: str) -> dict:
    """Read rope_theta and rope_scaling from either config.json layout.

    Configs written before transformers 5 keep `rope_theta` and `rope_scaling` at the top level.
    transformers 5 writes a single `rope_parameters` dict that contains both. As in transformers
    5.25, a non-empty `rope_scaling` takes precedence over `rope_parameters`, and a theta inside
    the dict takes precedence over the top-level one.
    """
    parameters = dict(kwargs.get("rope_scaling") or rope_parameters or {})
    if any(isinstance(value, dict) for value in parameters.values()):
        raise ValueError(f"{where}: rope parameters per layer type are not supported: {parameters}")
    if parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor {parameters['partial_rotary_factor']} is not "
                         "supported; rope rotates the whole head here")
    theta = parameters.pop("rope_theta", kwargs.get("rope_theta", ModelConfig.rope_theta))
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type == "default":
        return {"rope_theta": theta, "rope_scaling": None}
    if rope_type == "llama3":
        # transformers falls back to max_position_embeddings when this key is absent
        parameters.setdefault("original_max_position_embeddings",
                              kwargs.get("max_position_embeddings", ModelConfig.max_position_embeddings))
    return {"rope_theta": theta, "rope_scaling": parameters}


# Named shapes for models created from scratch. vocab_size is replaced by the tokenizer's size.
PRESETS = {
    # the unit tests' model: a few thousand parameters per layer
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048),
    # the default run's model: trains on the synthetic task in minutes on two CPU cores
    "small": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True),
}

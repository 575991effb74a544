"""Load and save models in the Hugging Face folder layout.

A folder contains `config.json`, the weights as `model.safetensors` or as shards listed in
`model.safetensors.index.json`, `tokenizer.json`, and `generation_config.json`. Our parameter names
are the HF names, so no renaming table is needed. Weights are read only through safetensors.
"""

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.tokenizer import Tokenizer
from model.transformer import Transformer, rope_inverse_frequencies

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


def atomic_write(path: str | Path, write):
    """Call write(temporary_path), fsync the file and rename it to `path`, so a crash leaves either
    the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.chmod(tmp, 0o644)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


def weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX_NAME).is_file():
        with open(folder / INDEX_NAME) as f:
            weight_map = json.load(f)["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME} found")


def load_state_dict(folder: str | Path, device="cpu") -> dict[str, torch.Tensor]:
    state = {}
    for path in weight_files(Path(folder)):
        try:
            state.update(load_file(path, device=str(device)))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: cannot read weights ({e}); the file is truncated or not safetensors, "
                             "so copy or export the model again") from e
    return state


def load_pretrained(path: str | Path, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Load an HF-layout folder into our Transformer; dtype None keeps the stored dtype."""
    folder = Path(path)
    config = ModelConfig.from_hf(folder)
    state = load_state_dict(folder, device)
    if config.tie_word_embeddings:
        # a tied checkpoint may also store this copy of the embedding, which transformers ignores too
        state.pop("lm_head.weight", None)
    for name in [k for k in state if k.endswith("rotary_emb.inv_freq")]:
        del state[name]  # older exports saved the rope buffer, which is rebuilt from config.json below
    with torch.device("meta"):
        model = Transformer(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        problems = [f"{label} ({len(names)}): {names[:8]}"
                    for label, names in (("missing", missing), ("unexpected", unexpected)) if names]
        raise ValueError(
            f"{folder}: weights do not match config.json ({config.architecture}, "
            f"{config.num_hidden_layers} layers, attention_bias={config.attention_bias}, "
            f"qk_norm={config.qk_norm}, tie_word_embeddings={config.tie_word_embeddings}); the folder needs the "
            "config.json saved with these weights: " + "; ".join(problems)
        )
    expected_shapes = {k: v.shape for k, v in model.state_dict().items()}
    wrong = [f"{k} {tuple(v.shape)} != {tuple(expected_shapes[k])}" for k, v in state.items() if v.shape != expected_shapes[k]]
    if wrong:
        raise ValueError(f"{folder}: weight shapes do not match config.json: {wrong[:4]}")
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # the rope buffer is not stored in checkpoints: build it on the real device
    model.inv_freq = rope_inverse_frequencies(config).to(device)
    return model


def load_model_and_tokenizer(path: str | Path, dtype: torch.dtype | None = torch.float32) -> tuple[Tokenizer, Transformer]:
    """Load an HF-layout folder as a model and its tokenizer with the PCL tags added.

    Tags that the folder's tokenizer lacks get new ids. When those ids do not fit the embedding
    matrix, it grows to fit them. Each new id's input and output embedding start at the mean of the
    ids the model was trained with, also where the id takes an unused padding row. Raises
    ValueError when the tokenizer does not belong to the model.
    """
    folder = Path(path)
    model = load_pretrained(folder, dtype=dtype)
    tok = Tokenizer.from_folder(folder)
    rows = model.model.embed_tokens.weight.shape[0]
    added = set(tok.added_ids)
    largest = max(i for i in tok.tk.get_vocab(with_added_tokens=True).values() if i not in added)
    if largest >= rows:
        raise ValueError(f"{folder}: tokenizer.json has ids up to {largest} but the model's embedding "
                         f"matrix has {rows} rows, so the tokenizer does not belong to this model; put the "
                         "model's own tokenizer.json in the folder")
    if tok.added_ids:
        known = min(tok.added_ids)  # the ids below were trained with the model
        if tok.vocab_size > model.config.vocab_size:
            log.info("resizing embeddings %d -> %d for the PCL tokens", model.config.vocab_size, tok.vocab_size)
            model.resize_token_embeddings(tok.vocab_size)
        with torch.no_grad():
            for weight in {id(w): w for w in (model.model.embed_tokens.weight, model.lm_head.weight)}.values():
                weight[tok.added_ids] = weight[:known].mean(0)
        log.info("added %d PCL tokens to the tokenizer of %s", len(tok.added_ids), folder)
    check_tokenizer_fits(model, tok)
    return tok, model


def check_tokenizer_fits(model: Transformer, tokenizer: Tokenizer):
    """Raise ValueError unless every id of `tokenizer` has a row in the model's embedding matrix.

    A tokenizer may have fewer ids than rows (Qwen pads its embeddings), but never more.
    """
    rows = model.model.embed_tokens.weight.shape[0]
    needed = tokenizer.max_id + 1
    if needed > rows:
        raise ValueError(
            f"the tokenizer has ids up to {needed - 1} but the embedding matrix has {rows} rows; "
            f"call model.resize_token_embeddings({needed}) after adding tokens"
        )


def save_pretrained(model: Transformer, tokenizer: Tokenizer | None, path: str | Path,
                    max_shard_bytes: int | None = None):
    """Write the HF layout; with max_shard_bytes, split the weights into shards plus an index."""
    folder = Path(path)
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper must not leak into names
    if tokenizer is not None:
        check_tokenizer_fits(model, tokenizer)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # stored once, as the input embedding

    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_shard_bytes is not None and current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    shards.append(current)

    metadata = {"format": "pt"}
    if len(shards) == 1:
        atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(shards[0], tmp, metadata=metadata))
        (folder / INDEX_NAME).unlink(missing_ok=True)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            atomic_write(folder / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata=metadata))
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
        (folder / WEIGHTS_NAME).unlink(missing_ok=True)

    hf_config = config.to_hf()
    # transformers 5 reads "dtype" before "torch_dtype". A "dtype" kept in `extra` from a loaded config
    # would be stale after a cast, so both keys get the dtype of the saved weights.
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf_config["torch_dtype"] = hf_config["dtype"] = dtype
    generation = {}
    if tokenizer is not None:
        hf_config["eos_token_id"] = tokenizer.eos_id
        hf_config["pad_token_id"] = tokenizer.pad_id
        if tokenizer.bos_id is not None:
            hf_config["bos_token_id"] = tokenizer.bos_id
        tokenizer.save(folder)
        # any server that honours generation_config.json stops at the marker, as PCL inference does
        generation = {"eos_token_id": [tokenizer.eos_id, tokenizer.marker_id], "pad_token_id": tokenizer.pad_id}
    write_json(folder / "config.json", hf_config)
    write_json(folder / "generation_config.json", generation)

"""Tests for train_state: checkpoint folders, manifests, rotation, optimizer and RNG state."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from train_state import (MANIFEST, STATE_FORMAT, CheckpointError, CheckpointStore, load_optimizer_state,
                         optimizer_state, rng_state, set_rng_state)
from conftest import random_model


def tiny_model(tok, seed=0):
    return random_model(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size), seed=seed)


def save(store, tok, step, model=None, reference=None, reference_step=None):
    state = {"format": STATE_FORMAT, "step": step}
    tensors = {"rng.torch": torch.get_rng_state()}
    return store.save(step, model or tiny_model(tok), tok, state, tensors, reference, reference_step)


def test_checkpoint_folder_contents(tmp_path, tok):
    store = CheckpointStore(tmp_path, keep=2)
    folder = save(store, tok, 7)
    assert folder == tmp_path / "step-000007"
    manifest = json.loads((folder / MANIFEST).read_text())
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json", "trainer_state.json", "trainer_state.safetensors"}
    assert set(manifest["files"]) == expected
    assert manifest["step"] == 7
    assert not list(tmp_path.glob("*.tmp"))


def test_load_round_trip(tmp_path, tok):
    store = CheckpointStore(tmp_path, keep=2)
    model = tiny_model(tok, seed=3)
    save(store, tok, 5, model=model)
    checkpoint = store.load_latest()
    assert checkpoint.step == 5
    assert checkpoint.state == {"format": STATE_FORMAT, "step": 5}
    for name, value in model.state_dict().items():
        assert torch.equal(checkpoint.model.state_dict()[name], value), name
    assert checkpoint.tokenizer.encode("12 apples") == tok.encode("12 apples")
    assert checkpoint.reference is None


def test_rotation_keeps_newest(tmp_path, tok):
    store = CheckpointStore(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        save(store, tok, step)
    assert [f.name for f in store.step_folders()] == ["step-000003", "step-000004"]
    assert not list(tmp_path.glob("*.deleting"))


def test_reference_written_once_and_removed(tmp_path, tok):
    store = CheckpointStore(tmp_path, keep=2)
    reference = tiny_model(tok, seed=9)
    save(store, tok, 4, reference=reference, reference_step=3)
    reference_file = tmp_path / "reference-000003" / "model.safetensors"
    written = reference_file.stat().st_mtime_ns
    save(store, tok, 5, reference=reference, reference_step=3)
    assert reference_file.stat().st_mtime_ns == written
    loaded = store.load_latest().reference
    assert torch.equal(loaded.lm_head.weight, reference.lm_head.weight)
    assert not loaded.training
    # two checkpoints without a reference push out both that name it
    save(store, tok, 6)
    save(store, tok, 7)
    assert not (tmp_path / "reference-000003").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip byte", "delete manifest", "delete file"])
def test_damaged_checkpoint_falls_back(tmp_path, tok, caplog, damage):
    store = CheckpointStore(tmp_path, keep=3)
    save(store, tok, 1)
    save(store, tok, 2)
    bad = tmp_path / "step-000002"
    target = bad / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "flip byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete manifest":
        target = bad / MANIFEST
        target.unlink()
    else:
        target.unlink()

    checkpoint = store.load_latest()
    assert checkpoint.step == 1
    assert str(target) in caplog.text
    assert (tmp_path / "step-000002.bad").is_dir()
    assert [f.name for f in store.step_folders()] == ["step-000001"]


def test_no_usable_checkpoint_raises(tmp_path, tok):
    store = CheckpointStore(tmp_path, keep=3)
    folder = save(store, tok, 1)
    (folder / "trainer_state.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*trainer_state\.json: .*bytes, expected"):
        store.load_latest()


def test_other_format_rejected(tmp_path, tok):
    store = CheckpointStore(tmp_path, keep=3)
    store.save(1, tiny_model(tok), tok, {"format": STATE_FORMAT + 1}, {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="written by another version"):
        store.load_latest()


def test_partial_write_removed(tmp_path, tok):
    store = CheckpointStore(tmp_path, keep=3)
    save(store, tok, 1)
    (tmp_path / "step-000002.tmp").mkdir()
    (tmp_path / "step-000002.tmp" / "model.safetensors").write_bytes(b"partial")
    assert store.load_latest().step == 1
    assert not (tmp_path / "step-000002.tmp").exists()


def test_empty_store_loads_none(tmp_path):
    assert CheckpointStore(tmp_path / "absent", keep=1).load_latest() is None


def test_optimizer_state_round_trip(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.95))
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    tensors, other = optimizer_state(optimizer)
    # through the files of a checkpoint, which also gives the copy tensors of its own
    save_file(tensors, tmp_path / "optimizer.safetensors")
    tensors = load_file(tmp_path / "optimizer.safetensors")
    other = json.loads(json.dumps(other))
    copy = torch.nn.Linear(4, 3)
    copy.load_state_dict(model.state_dict())
    restored = torch.optim.AdamW(copy.parameters(), lr=0.1, betas=(0.9, 0.95))
    load_optimizer_state(restored, tensors, other)
    assert restored.param_groups[0]["betas"] == (0.9, 0.95)

    x = torch.randn(5, 4)
    for m, opt in ((model, optimizer), (copy, restored)):
        opt.zero_grad()
        m(x).square().sum().backward()
        opt.step()
    assert torch.equal(model.weight, copy.weight)
    assert torch.equal(model.bias, copy.bias)


def test_rng_state_round_trip():
    generator = torch.Generator().manual_seed(1)
    rng = random.Random(2)
    tensors, values = rng_state(generator, rng)
    values = json.loads(json.dumps(values))

    def draw():
        return (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item(),
                rng.random())

    expected = draw()
    set_rng_state(tensors, values, generator, rng)
    assert draw() == expected

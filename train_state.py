"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is one folder, OUT/checkpoints/step-NNNNNN/, named by the optimizer steps done:

    config.json, model.safetensors,    the model in the Hugging Face layout, which other tools
    tokenizer.json, ...                can load (model.checkpoint.save_pretrained)
    trainer_state.safetensors          optimizer tensors (AdamW moments, step counts) and the
                                       torch RNG states
    trainer_state.json                 step, stage, learning-rate schedule, Python and NumPy RNG
                                       states, data position, evaluation-track pool, summary so
                                       far, non-finite update counters, the run's options
    manifest.json                      size and SHA-256 of every file above, written last

The frozen reference model of an rl or hybrid stage does not change during its stage, so it is
written once per stage, to OUT/checkpoints/reference-NNNNNN/, where NNNNNN is the step at which
the stage began. The manifest of each checkpoint of that stage names that folder and the SHA-256
of the folder's own manifest.

Every folder is written under a `.tmp` name, its files are fsynced, and then it is renamed, so a
crash leaves either a complete checkpoint or a `.tmp` folder that the next resume removes.
Nothing is read through pickle: tensors come from safetensors files and the rest from JSON.
"""

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.checkpoint import load_pretrained, save_pretrained
from model.tokenizer import Tokenizer
from model.transformer import Transformer

log = logging.getLogger("train")

MANIFEST = "manifest.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
STATE_FORMAT = 1  # version of trainer_state.json's layout
STEP_FOLDER = re.compile(r"step-(\d+)")
# Tests only: "STEP:SECONDS" makes the write of checkpoint STEP sleep after the model files and
# before the trainer state and the manifest, so that a test can kill the process mid-write.
PAUSE_VARIABLE = "PCL_TEST_CHECKPOINT_PAUSE"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """A checkpoint read by CheckpointStore.load()."""

    folder: Path
    step: int
    state: dict  # trainer_state.json
    tensors: dict[str, torch.Tensor]  # trainer_state.safetensors, on the CPU
    model: Transformer  # float32, on the CPU
    tokenizer: Tokenizer
    reference: Transformer | None  # the frozen reference of an rl or hybrid stage, on the CPU


class CheckpointStore:
    """The checkpoint folders of one run: write, rotate, find the newest usable one."""

    def __init__(self, root: str | Path, keep: int):
        self.root, self.keep = Path(root), keep
        # Reference folders that this process wrote or verified. Any other one is written again
        # before a checkpoint names it, because it may be the corrupted folder that made the resume
        # fall back to an older checkpoint.
        self.trusted_references: set[str] = set()

    def step_folders(self) -> list[Path]:
        """Return the complete checkpoint folders, oldest first."""
        if not self.root.is_dir():
            return []
        folders = [p for p in self.root.iterdir() if p.is_dir() and STEP_FOLDER.fullmatch(p.name)]
        return sorted(folders, key=lambda p: int(STEP_FOLDER.fullmatch(p.name)[1]))

    def is_finished(self, folder: Path) -> bool:
        """Return whether the checkpoint in `folder` was written after the run's last step, and False
        when its trainer_state.json cannot be read."""
        try:
            return json.loads((folder / STATE_JSON).read_text()).get("finished") is True
        except (OSError, ValueError, AttributeError):
            return False

    def clear(self):
        """Remove every checkpoint and reference folder, and what an interrupted clear() left."""
        doomed = self.root.with_name(self.root.name + ".deleting")
        if self.root.exists():
            remove_folder(self.root)
        elif doomed.exists():
            shutil.rmtree(doomed)

    def remove_partial_writes(self):
        """Remove the `.tmp` and `.deleting` folders that a killed write or rotation left."""
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.suffix in (".tmp", ".deleting"):
                log.info("removing %s, left by an interrupted checkpoint write or removal", path)
                shutil.rmtree(path)

    # writing ---------------------------------------------------------------------------------

    def save(self, step: int, model: Transformer, tokenizer: Tokenizer, state: dict,
             tensors: dict[str, torch.Tensor], reference: Transformer | None = None,
             reference_step: int | None = None) -> Path:
        """Write checkpoint `step`, then remove the checkpoints beyond the newest `keep`.

        `state` goes to trainer_state.json and `tensors` to trainer_state.safetensors. The reference
        model is written once per stage, named by `reference_step`, the step at which it was copied.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        manifest_extra = {"step": step}
        if reference is not None:
            reference_folder = self.root / f"reference-{reference_step:06d}"
            if reference_folder.name not in self.trusted_references:
                write_folder(reference_folder, lambda tmp: save_pretrained(reference, None, tmp))
                self.trusted_references.add(reference_folder.name)
            manifest_extra["reference"] = {"folder": reference_folder.name,
                                           "sha256": file_sha256(reference_folder / MANIFEST)}

        def write(tmp: Path):
            save_pretrained(model, tokenizer, tmp)
            pause_for_tests(step)
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / STATE_TENSORS)
            with open(tmp / STATE_JSON, "w") as f:
                json.dump(state, f)

        folder = write_folder(self.root / f"step-{step:06d}", write, manifest_extra)
        self.rotate()
        return folder

    def rotate(self):
        """Remove the checkpoints beyond the newest `keep`, then the reference folders that no
        remaining checkpoint names."""
        folders = self.step_folders()
        for old in folders[:-self.keep]:
            remove_folder(old)
        used = set()
        for folder in folders[-self.keep:]:
            try:
                reference = json.loads((folder / MANIFEST).read_text()).get("reference")
            except (OSError, ValueError):
                return  # an unreadable manifest may name any reference, so keep them all
            if reference:
                used.add(reference["folder"])
        for path in self.root.glob("reference-*"):
            if path.is_dir() and path.suffix == "" and path.name not in used:
                remove_folder(path)

    # reading ---------------------------------------------------------------------------------

    def load_latest(self) -> Checkpoint | None:
        """Load the newest checkpoint that passes its checks, or return None when there is none.

        A checkpoint that fails (missing manifest, wrong size or SHA-256, unreadable file) is
        logged with the failing file and renamed to `step-NNNNNN.bad`, and the next older one is
        tried. Raises CheckpointError when checkpoints exist but none can be used.
        """
        self.remove_partial_writes()
        folders = self.step_folders()
        problems = []
        for folder in reversed(folders):
            try:
                checkpoint = self.load(folder)
            except CheckpointError as e:
                log.warning("checkpoint %s is unusable: %s", folder, e)
                problems.append((folder, str(e)))
                continue
            for bad, _ in problems:
                # out of the way of the new checkpoint of that step, and kept for inspection
                renamed = bad.with_name(bad.name + ".bad")
                if renamed.exists():
                    remove_folder(renamed)
                os.replace(bad, renamed)
                log.warning("renamed %s to %s.bad; resuming from the older %s", bad, bad.name, folder.name)
            return checkpoint
        if problems:
            listed = "; ".join(message for _, message in problems)
            raise CheckpointError(f"no usable checkpoint in {self.root}: {listed}. Delete {self.root} "
                                  "to start the run from its first step")
        return None

    def load(self, folder: Path) -> Checkpoint:
        """Check `folder` against its manifest and load it; raises CheckpointError naming the file."""
        manifest = verify_folder(folder)
        step = int(STEP_FOLDER.fullmatch(folder.name)[1])
        state = read_json(folder / STATE_JSON)
        if state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{folder / STATE_JSON}: format {state.get('format')!r}, expected "
                                  f"{STATE_FORMAT}; it was written by another version of train.py")
        try:
            tensors = load_file(folder / STATE_TENSORS)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{folder / STATE_TENSORS}: cannot read ({e})") from e
        try:
            model = load_pretrained(folder, dtype=torch.float32)
            tokenizer = Tokenizer.from_folder(folder)
        except (ValueError, OSError) as e:
            raise CheckpointError(str(e)) from e

        reference = None
        if manifest.get("reference"):
            entry = manifest["reference"]
            if not isinstance(entry, dict) or not isinstance(entry.get("folder"), str) or "/" in entry["folder"]:
                raise CheckpointError(f"{folder / MANIFEST}: invalid reference entry {entry!r}")
            reference_folder = self.root / entry["folder"]
            verify_folder(reference_folder)
            if file_sha256(reference_folder / MANIFEST) != entry.get("sha256"):
                raise CheckpointError(f"{reference_folder / MANIFEST}: SHA-256 does not match the one in "
                                      f"{folder / MANIFEST}; the reference model was replaced")
            try:
                reference = load_pretrained(reference_folder, dtype=torch.float32)
            except (ValueError, OSError) as e:
                raise CheckpointError(str(e)) from e
            reference.eval().requires_grad_(False)
            self.trusted_references.add(reference_folder.name)
        return Checkpoint(folder, step, state, tensors, model, tokenizer, reference)


# folders with a manifest ---------------------------------------------------------------------


def write_folder(final: Path, write, manifest_extra: dict | None = None) -> Path:
    """Call write(tmp) on an empty temporary folder, add manifest.json with the size and SHA-256 of
    each file, fsync everything and rename the folder to `final`, replacing an older one."""
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    files = {path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
             for path in sorted(tmp.iterdir()) if path.is_file()}
    with open(tmp / MANIFEST, "w") as f:
        json.dump({**(manifest_extra or {}), "files": files}, f, indent=1)
    for path in tmp.iterdir():
        fsync_path(path)
    fsync_path(tmp)
    if final.exists():
        remove_folder(final)
    os.replace(tmp, final)
    fsync_path(final.parent)
    return final


def verify_folder(folder: Path) -> dict:
    """Check every file listed in `folder`'s manifest for its size and SHA-256; return the manifest."""
    manifest = read_json(folder / MANIFEST)
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{folder / MANIFEST}: lists no files")
    for name, entry in files.items():
        path = folder / name
        if "/" in name or not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
            raise CheckpointError(f"{folder / MANIFEST}: invalid entry for {name}: {entry!r}")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, expected {entry['bytes']}; the file is truncated "
                                  "or was changed after it was written")
        if file_sha256(path) != entry.get("sha256"):
            raise CheckpointError(f"{path}: SHA-256 does not match {MANIFEST}; the file is corrupted")
    return manifest


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint was not completely written") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_path(path: Path):
    """Flush a file, or a folder's list of names, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_folder(folder: Path):
    """Rename `folder` out of the checkpoint names, then delete it, so a kill during the deletion
    leaves a `.deleting` folder rather than a checkpoint with missing files."""
    doomed = folder.with_name(folder.name + ".deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def pause_for_tests(step: int):
    value = os.environ.get(PAUSE_VARIABLE)
    if value:
        pause_step, seconds = value.split(":")
        if int(pause_step) == step:
            time.sleep(float(seconds))


# optimizer and RNG state ---------------------------------------------------------------------


def optimizer_state(optimizer: torch.optim.Optimizer | dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split optimizer.state_dict(), or such a dict itself, into safetensors tensors
    ("optimizer.{index}.{key}") and the JSON-serialisable rest (parameter groups and non-tensor state)."""
    saved = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, other = {}, defaultdict(dict)
    for index, values in saved["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                other[str(index)][key] = value
    return tensors, {"param_groups": saved["param_groups"], "state": dict(other)}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], saved: dict):
    """Inverse of optimizer_state(); the optimizer moves each tensor to its parameter's device."""
    optimizer.load_state_dict(optimizer_state_dict(tensors, saved))


def optimizer_state_dict(tensors: dict[str, torch.Tensor], saved: dict) -> dict:
    """Rebuild the optimizer.state_dict() that optimizer_state() split."""
    state = defaultdict(dict)
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state[int(index)][key] = tensor
    for index, values in saved["state"].items():
        state[int(index)].update(values)
    # JSON turned AdamW's betas tuple into a list
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in saved["param_groups"]]
    return {"state": dict(state), "param_groups": groups}


def rng_state(generator: torch.Generator, rng: random.Random) -> tuple[dict[str, torch.Tensor], dict]:
    """Capture every random number generator a run draws from: torch's global one (and CUDA's),
    the trainer's torch.Generator for sampling, Python's and NumPy's global ones, and the trainer's
    random.Random. Returns (tensors, JSON-serialisable values)."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    values = {"python": random.getstate(), "trainer": rng.getstate(),
              "numpy": [kind, keys.tolist(), position, has_gauss, cached_gaussian]}
    return tensors, values


def set_rng_state(tensors: dict[str, torch.Tensor], values: dict, generator: torch.Generator, rng: random.Random):
    """Restore what rng_state() captured. CUDA states are restored only when the same number of
    devices is visible.

    NOTE: the CUDA branches have not run on a GPU; the resume tests run on CPU only.
    """
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.generator"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
    if cuda and len(cuda) == sum(name.startswith("rng.cuda.") for name in tensors):
        torch.cuda.set_rng_state_all(cuda)

    def as_tuple(state):  # JSON turned the nested tuples of random.getstate() into lists
        version, internal, gauss = state
        return version, tuple(internal), gauss

    random.setstate(as_tuple(values["python"]))
    rng.setstate(as_tuple(values["trainer"]))
    kind, keys, position, has_gauss, cached_gaussian = values["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))

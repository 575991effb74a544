"""Checkpoints and --resume in train.py.

The kill tests run train.py in subprocesses on the tiny config and stop each run twice. The first
stop is a SIGKILL at a moment drawn from a seeded RNG. The second is a SIGKILL in the middle of a
checkpoint write, a SIGINT or a SIGTERM. Then the run is resumed to its end, and it must give the
per-step metrics, final metrics, held-out completions and weights of a run that was never stopped.
That run happens in this process, which is single-threaded as the subprocesses are, and gives the
same bits as a subprocess.
"""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from test_train import TINY
from train_state import CheckpointStore

ROOT = Path(__file__).resolve().parent.parent
STEPS = 8  # per run, warm-up included: 8 sft steps, or 3 warm-up and 5 rl or hybrid steps
# more steps than TINY, so that a kill lands inside the run, and a checkpoint every 2 steps, so
# that a resume often repeats steps that the killed run had done
KILL_FLAGS = [*TINY, "--save-every", "2", "--keep", "2"]
PHASE_STEPS = {"sft": ["--steps", "8"], "rl": ["--steps", "5"], "hybrid": ["--steps", "5"]}
TIMING_KEYS = {"dt", "tokens_per_s"}  # measured, so different in every run
RUN_KEYS = {"wall_seconds", "resumed_from_step"}  # summary keys that describe the process, not the results
TOLERANCE = 1e-6


# helpers -------------------------------------------------------------------------------------


class Process:
    """train.py in a subprocess, single-threaded as the in-process tests are, logging to a file."""

    def __init__(self, out: Path, args: list[str], env: dict | None = None):
        self.out = out
        self.log_path = out.parent / f"{out.name}-{len(list(out.parent.glob(out.name + '-*.log')))}.log"
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
        with open(self.log_path, "w") as log:
            self.popen = subprocess.Popen([sys.executable, "train.py", *args, "--out", str(out)], cwd=ROOT,
                                          env=environment, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_until(self, condition, timeout: float = 120.0):
        """Poll `condition` every 5 ms; fail if the process ends first."""
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.popen.poll() is None, f"train.py ended (exit {self.popen.returncode}) too early:\n{self.log()}"
            assert time.monotonic() < deadline, f"timed out waiting for train.py:\n{self.log()}"
            time.sleep(0.005)

    def wait_for_step(self, step: int):
        """Wait until this process has logged `step` steps in metrics.jsonl. Lines of an earlier
        process count only once this one has cut them back to its checkpoint."""
        self.wait_until(lambda: "evaluation track:" in self.log() and steps_logged(self.out) >= step)

    def signal(self, signum: int) -> int:
        self.popen.send_signal(signum)
        return self.popen.wait(timeout=120)

    def finish(self) -> str:
        code = self.popen.wait(timeout=300)
        assert code == 0, f"train.py failed (exit {code}):\n{self.log()}"
        return self.log()


def steps_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def newest_checkpoint(out: Path) -> int:
    folders = CheckpointStore(out / "checkpoints", keep=1).step_folders()
    return int(folders[-1].name.removeprefix("step-")) if folders else 0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def flatten(value, prefix="") -> dict:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def max_difference(expected: dict, actual: dict, skip: set) -> float:
    """Assert that two flat records have the same keys and equal non-numbers; return the largest
    absolute difference of their numbers."""
    assert expected.keys() == actual.keys()
    worst = 0.0
    for key in expected.keys() - skip:
        a, b = expected[key], actual[key]
        if isinstance(a, float) and math.isnan(a):
            assert isinstance(b, float) and math.isnan(b), key
        elif isinstance(a, (int, float)) and not isinstance(a, bool):
            worst = max(worst, abs(a - b))
        else:
            assert a == b, key
    return worst


def compare_runs(reference: Path, resumed: Path) -> float:
    """Assert that `resumed` gave the results of `reference` to TOLERANCE; return the largest
    absolute difference over every per-step metric and final metric."""
    expected, actual = read_jsonl(reference / "metrics.jsonl"), read_jsonl(resumed / "metrics.jsonl")
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    worst = max(max_difference(a, b, TIMING_KEYS) for a, b in zip(expected, actual))
    summaries = [flatten(json.loads((out / "summary.json").read_text())) for out in (reference, resumed)]
    summaries[1] = {k: v for k, v in summaries[1].items() if k != "resumed_from_step"}
    worst = max(worst, max_difference(*summaries, RUN_KEYS))
    assert worst <= TOLERANCE
    assert read_jsonl(resumed / "eval_samples.jsonl") == read_jsonl(reference / "eval_samples.jsonl")
    weights = [load_file(out / "model" / "model.safetensors") for out in (reference, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    return worst


# kill and resume -----------------------------------------------------------------------------


@pytest.mark.parametrize("phase, second_stop", [("sft", "SIGTERM"), ("rl", "checkpoint write"),
                                                ("hybrid", "SIGINT")])
def test_killed_run_resumes_exactly(tmp_path, phase, second_stop):
    rng = random.Random(f"kill {phase}")
    args = [*KILL_FLAGS, *PHASE_STEPS[phase], "--phase", phase]
    out = tmp_path / "run"
    stops = []

    # 1. SIGKILL at a random moment: up to 50 ms after step 2, 3 or 4, inside a step, a checkpoint
    # write, or the warm-up's evaluation, so that the newest checkpoint is at most step 4
    first = Process(out, args)
    train.main([*args, "--out", str(tmp_path / "reference")])  # while the subprocess starts
    step, delay = rng.randint(2, 4), rng.uniform(0, 0.05)
    first.wait_for_step(step)
    time.sleep(delay)
    assert first.signal(signal.SIGKILL) == -signal.SIGKILL
    stops.append(f"SIGKILL {delay * 1000:.0f} ms after step {step} (logged {steps_logged(out)}, "
                 f"newest checkpoint {newest_checkpoint(out)})")

    # 2. resume, then stop it again
    resumed_at = newest_checkpoint(out)
    if second_stop == "checkpoint write":
        # the write of checkpoint 6 sleeps after the model files, and is killed there
        second = Process(out, [*args, "--resume"], env={"PCL_TEST_CHECKPOINT_PAUSE": "6:120"})
        partial = out / "checkpoints" / "step-000006.tmp"
        second.wait_until(lambda: (partial / "model.safetensors").is_file())
        assert second.signal(signal.SIGKILL) == -signal.SIGKILL
        assert not (partial / "manifest.json").exists()
        assert not (out / "checkpoints" / "step-000006").exists()
        stops.append("SIGKILL inside the write of checkpoint 6, after its model files")
    else:
        signum = getattr(signal, second_stop)
        second = Process(out, [*args, "--resume"])
        step = rng.randint(resumed_at + 1, STEPS - 2)
        second.wait_for_step(step)
        assert second.signal(signum) == 128 + signum
        stopped_at = steps_logged(out)
        assert newest_checkpoint(out) == stopped_at  # the step in progress was finished and saved
        assert f"Resume with: python train.py --resume --out {out}" in second.log()
        stops.append(f"{second_stop} after step {step}, stopped and saved at step {stopped_at}")
    assert f"resumed from {out / 'checkpoints'}" in second.log() or resumed_at == 0

    # 3. resume to the end with the command that the stop message prints
    log = Process(out, ["--resume"]).finish()
    if second_stop == "checkpoint write":
        assert "step-000006.tmp, left by an interrupted checkpoint write" in log
    worst = compare_runs(tmp_path / "reference", out)
    print(f"{phase}: {'; '.join(stops)}; max abs difference {worst}")


# resume in-process -------------------------------------------------------------------------


def run(out: Path, *extra):
    train.main([*TINY, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def finished_sft(tmp_path_factory) -> Path:
    """A finished sft run with checkpoints after steps 2, 3 and 4."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run(out, "--phase", "sft", "--steps", "4", "--save-every", "1", "--keep", "3")
    return out


def copy_run(source: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(source, out)
    return out


@pytest.mark.parametrize("damage", ["truncated weights", "corrupted optimizer state", "missing manifest"])
def test_damaged_latest_checkpoint_skipped(finished_sft, tmp_path, caplog, damage):
    out = copy_run(finished_sft, tmp_path)
    latest = out / "checkpoints" / "step-000004"
    if damage == "truncated weights":
        bad_file = latest / "model.safetensors"
        bad_file.write_bytes(bad_file.read_bytes()[:-1000])
    elif damage == "corrupted optimizer state":
        bad_file = latest / "trainer_state.safetensors"
        data = bytearray(bad_file.read_bytes())
        data[-10] ^= 0x01
        bad_file.write_bytes(bytes(data))
    else:
        bad_file = latest / "manifest.json"
        bad_file.unlink()
    caplog.set_level("INFO")
    train.main(["--resume", "--out", str(out)])
    assert f"checkpoint {latest} is unusable: {bad_file}" in caplog.text
    assert f"resumed from {out / 'checkpoints' / 'step-000003'}" in caplog.text
    assert (out / "checkpoints" / "step-000004.bad").is_dir()
    assert compare_runs(finished_sft, out) <= TOLERANCE


def test_finished_run_resumes_to_same_outputs(finished_sft, tmp_path):
    out = copy_run(finished_sft, tmp_path)
    train.main(["--resume", "--out", str(out)])
    assert compare_runs(finished_sft, out) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 4


def test_resume_rejects_changed_options(finished_sft, tmp_path, capsys):
    out = copy_run(finished_sft, tmp_path)
    with pytest.raises(SystemExit):
        train.main(["--resume", "--out", str(out), "--lr", "0.5", "--batch-size", "3", "--log-every", "2"])
    error = capsys.readouterr().err
    assert "--batch-size is 3 but the run used 4" in error
    assert "--lr is 0.5 but the run used 0.003" in error
    assert "--log-every" not in error.split("error:")[1]


def test_resume_accepts_same_command(finished_sft, tmp_path):
    out = copy_run(finished_sft, tmp_path)
    run(out, "--phase", "sft", "--steps", "4", "--save-every", "2", "--keep", "1", "--log-every", "3", "--resume")
    assert compare_runs(finished_sft, out) == 0


def test_resume_rejects_edited_run_config(finished_sft, tmp_path, capsys):
    out = copy_run(finished_sft, tmp_path)
    config = json.loads((out / "run_config.json").read_text())
    config["seed"] = 5
    (out / "run_config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit) as raised:
        train.main(["--resume", "--out", str(out)])
    assert "--seed is 5 but the run used 0" in str(raised.value.code)
    assert "trainer_state.json" in str(raised.value.code)


def test_resume_rejects_changed_dataset(tmp_path):
    data_dir = tmp_path / "gsm8k"
    shutil.copytree(Path(__file__).parent / "fixtures" / "gsm8k", data_dir)
    out = tmp_path / "run"
    run(out, "--phase", "sft", "--data", "gsm8k", "--data-dir", str(data_dir))
    text = (data_dir / "train.jsonl").read_text()
    (data_dir / "train.jsonl").write_text(text.replace("Mila has 3 boxes", "Mila has 4 boxes"))
    with pytest.raises(SystemExit) as raised:
        train.main(["--resume", "--out", str(out)])
    assert "the dataset rows differ" in str(raised.value.code)


def test_resume_without_run_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--resume", "--out", str(tmp_path / "nothing")])
    assert "contains no run to resume; start the run without --resume" in capsys.readouterr().err


def test_resume_before_first_checkpoint_restarts(tmp_path, caplog):
    out = tmp_path / "run"
    run(out, "--phase", "sft")
    reference = copy_run(out, tmp_path / "copy")
    shutil.rmtree(out / "checkpoints")
    caplog.set_level("INFO")
    train.main(["--resume", "--out", str(out)])
    assert "starting it from step 0" in caplog.text
    assert compare_runs(reference, out) == 0


def test_unfinished_run_not_overwritten(finished_sft, tmp_path):
    out = copy_run(finished_sft, tmp_path)
    shutil.rmtree(out / "checkpoints" / "step-000004")  # as if killed after step 3
    with pytest.raises(SystemExit) as raised:
        run(out, "--phase", "sft", "--steps", "4")
    assert "contains an unfinished run (newest checkpoint step-000003); continue it with --resume" in str(
        raised.value.code)
    assert (out / "checkpoints" / "step-000003").is_dir()


def test_finished_run_replaced(finished_sft, tmp_path):
    out = copy_run(finished_sft, tmp_path)
    run(out, "--phase", "sft", "--steps", "2", "--save-every", "1")
    names = [f.name for f in (out / "checkpoints").iterdir()]
    assert sorted(names) == ["step-000001", "step-000002"]
    assert len(read_jsonl(out / "metrics.jsonl")) == 2


def test_every_checkpoint_resumes_exactly(tmp_path):
    """Resume a hybrid run from each of its checkpoints, with and without a reference model."""
    full = tmp_path / "full"
    run(full, "--phase", "hybrid", "--steps", "3", "--save-every", "1", "--keep", "6")
    names = sorted(f.name for f in (full / "checkpoints").iterdir())
    assert names == ["reference-000003", "step-000001", "step-000002", "step-000003", "step-000004", "step-000005",
                     "step-000006"]
    for step in (2, 3, 4, 5):
        out = copy_run(full, tmp_path / f"from-{step}")
        for folder in (out / "checkpoints").glob("step-*"):
            if int(folder.name.removeprefix("step-")) > step:
                shutil.rmtree(folder)
        train.main(["--resume", "--out", str(out)])
        assert compare_runs(full, out) == 0, step


def test_resumed_reference_model_compiles_layers(tmp_path, monkeypatch):
    # With --compile-layers the reference model's forward passes run the compiled layer function, also
    # when the reference model comes from a checkpoint. Eager replaces the compiled function here.
    import model.transformer as transformer_module
    frozen_calls = []

    def layer(block, *args):
        frozen_calls.append(not block.input_layernorm.weight.requires_grad)
        return transformer_module._layer(block, *args)

    monkeypatch.setattr(transformer_module, "_layer_compiled", layer)
    full = tmp_path / "full"
    run(full, "--phase", "hybrid", "--steps", "3", "--save-every", "1", "--keep", "6", "--compile-layers")
    assert any(frozen_calls)
    out = copy_run(full, tmp_path / "from-4")  # step 4 is the first hybrid step, so a reference model is saved
    for folder in (out / "checkpoints").glob("step-*"):
        if int(folder.name.removeprefix("step-")) > 4:
            shutil.rmtree(folder)
    frozen_calls.clear()
    train.main(["--resume", "--out", str(out)])
    assert any(frozen_calls)
    assert compare_runs(full, out) == 0


# non-finite updates --------------------------------------------------------------------------


def poison_gradients(monkeypatch, bad_calls: set[int]):
    """Make the SFT backward pass write NaN into a gradient on the given calls (1-based), which in
    the sft phase are the steps."""
    original = train.sft_backward
    calls = [0]

    def sft_backward(model, *args, **kwargs):
        stats = original(model, *args, **kwargs)
        calls[0] += 1
        if calls[0] in bad_calls:
            next(model.parameters()).grad.fill_(math.nan)
        return stats

    monkeypatch.setattr(train, "sft_backward", sft_backward)


def test_non_finite_updates_skipped(tmp_path, monkeypatch, caplog):
    poison_gradients(monkeypatch, {2, 3})
    out = tmp_path / "run"
    run(out, "--phase", "sft", "--steps", "5", "--save-every", "1", "--keep", "10", "--max-bad-steps", "3")
    steps = read_jsonl(out / "metrics.jsonl")
    assert [s["skipped_updates"] for s in steps] == [0, 1, 1, 0, 0]
    assert math.isnan(steps[1]["grad_norm"])
    assert json.loads((out / "summary.json").read_text())["skipped_updates"] == 2
    assert "step 2: non-finite loss or gradient norm" in caplog.text
    # no checkpoint right after a skipped update
    assert sorted(f.name for f in (out / "checkpoints").iterdir()) == ["step-000001", "step-000004", "step-000005"]


def test_skipped_update_keeps_weights(tmp_path, monkeypatch):
    poison_gradients(monkeypatch, {2})
    out = tmp_path / "run"
    run(out, "--phase", "sft", "--steps", "2", "--save-every", "1", "--keep", "10")
    before = load_file(out / "checkpoints" / "step-000001" / "model.safetensors")
    after = load_file(out / "checkpoints" / "step-000002" / "model.safetensors")
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_bad_updates_stop_run(tmp_path, monkeypatch):
    poison_gradients(monkeypatch, {3, 4, 5, 6})
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as raised:
        run(out, "--phase", "sft", "--steps", "6", "--save-every", "1", "--keep", "10", "--max-bad-steps", "3")
    message = str(raised.value.code)
    assert "3 optimizer updates in a row had a non-finite loss or gradient norm, the last in step 5" in message
    assert f"The newest checkpoint, {out / 'checkpoints' / 'step-000002'}, is intact" in message
    store = CheckpointStore(out / "checkpoints", keep=10)
    assert [f.name for f in store.step_folders()] == ["step-000001", "step-000002"]
    assert store.load_latest().step == 2
    assert len(read_jsonl(out / "metrics.jsonl")) == 5


# no code from files, no network ----------------------------------------------------------------


def test_no_pickle_or_network(tmp_path, monkeypatch):
    import pickle
    import socket

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle, torch.load or a network connection was used")

    for module, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
                         (socket.socket, "connect"), (socket, "create_connection"), (socket, "getaddrinfo")]:
        monkeypatch.setattr(module, name, forbidden)
    out = tmp_path / "run"
    run(out, "--phase", "hybrid", "--steps", "3", "--save-every", "4")
    shutil.rmtree(out / "checkpoints" / "step-000006")
    train.main(["--resume", "--out", str(out)])
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 4


def test_sources_load_nothing_executable():
    sources = [ROOT / "train.py", ROOT / "train_state.py", *ROOT.glob("model/*.py"), *ROOT.glob("pcl/*.py"),
               *ROOT.glob("data/*.py"), *ROOT.glob("eval/*.py")]
    for path in sources:
        text = path.read_text()
        for word in ("import pickle", "torch.load(", "import socket", "urllib", "http.client", "import requests"):
            assert word not in text, f"{path.name} contains {word!r}"

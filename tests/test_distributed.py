"""Data-parallel training under torchrun: two CPU processes (gloo) against one.

Two processes that split each step's global batch must give the per-step losses and the final
weights of one process with the same options, up to float32 rounding. This is so because the
losses are normalised over the whole step, and a row's sampling draws do not depend on which
process samples it. A two-process run that is killed and resumed must match one that was never stopped.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import train
from test_resume import TIMING_KEYS, compare_runs, newest_checkpoint, steps_logged
from test_train import TINY

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available in this torch build")

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5
# 5 steps per phase: 5 sft steps, or 3 SFT warm-up steps then 2 rl or hybrid steps. The tiny
# model's rollouts all get reward 0, so their advantages are 0. The k1 KL estimator still gives
# every sampled token a gradient, so the rl steps change the weights through what was sampled.
PHASE_FLAGS = {"sft": ["--phase", "sft", "--steps", "5"],
               "rl": ["--phase", "rl", "--kl-estimator", "k1"],
               "hybrid": ["--phase", "hybrid"]}


class Torchrun:
    """train.py under `python -m torch.distributed.run --standalone` in its own process group, so
    that a test can kill the launcher and its workers together."""

    def __init__(self, out: Path, args: list[str], nproc: int = 2):
        self.out = out
        self.log_path = out.parent / f"{out.name}-{len(list(out.parent.glob(out.name + '-*.log')))}.log"
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "train.py", *args, "--out", str(out)]
        with open(self.log_path, "w") as log:
            self.popen = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                          start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text()

    def finish(self, timeout: float = 300) -> str:
        code = self.popen.wait(timeout=timeout)
        assert code == 0, f"torchrun train.py failed (exit {code}):\n{self.log()}"
        return self.log()

    def wait_for_step(self, step: int, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while steps_logged(self.out) < step:
            assert self.popen.poll() is None, f"torchrun ended (exit {self.popen.returncode}) too early:\n{self.log()}"
            assert time.monotonic() < deadline, f"timed out waiting for step {step}:\n{self.log()}"
            time.sleep(0.005)

    def kill_group(self):
        os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=60)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def largest_metric_difference(expected: list[dict], actual: list[dict]) -> float:
    """Return the largest absolute difference of the numbers that two runs logged per step."""
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    worst = 0.0
    for a, b in zip(expected, actual):
        assert a.keys() == b.keys()
        for key in a.keys() - TIMING_KEYS:
            if isinstance(a[key], float) and math.isnan(a[key]):
                assert math.isnan(b[key]), key
            elif isinstance(a[key], (int, float)):
                worst = max(worst, abs(a[key] - b[key]))
            else:
                assert a[key] == b[key], key
    return worst


def largest_weight_difference(first: Path, second: Path) -> float:
    weights = [load_file(out / "model" / "model.safetensors") for out in (first, second)]
    assert weights[0].keys() == weights[1].keys()
    return max((weights[0][name] - weights[1][name]).abs().max().item() for name in weights[0])


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
@pytest.mark.parametrize("phase", ["sft", "rl", "hybrid"])
def test_two_processes_match_one(tmp_path, phase, sharding):
    args = [*TINY, *PHASE_FLAGS[phase]]
    two = Torchrun(tmp_path / "two", args + (["--fsdp"] if sharding == "fsdp" else []))
    train.main([*args, "--out", str(tmp_path / "one")])  # while the workers start
    two.finish()

    one_metrics, two_metrics = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(two_metrics) == 5
    assert any(r["grad_norm"] > 0 for r in two_metrics if r["phase"] == phase)
    loss_difference = max(abs(a["loss"] - b["loss"]) for a, b in zip(one_metrics, two_metrics))
    metric_difference = largest_metric_difference(one_metrics, two_metrics)
    weight_difference = largest_weight_difference(tmp_path / "one", tmp_path / "two")
    print(f"{phase}, {sharding}: max abs difference, loss {loss_difference:.2e}, any metric {metric_difference:.2e}, "
          f"weights {weight_difference:.2e}")
    assert loss_difference <= TOLERANCE
    assert metric_difference <= TOLERANCE
    assert weight_difference <= TOLERANCE

    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["eval_examples"] == 4  # 2 held-out rows per process, gathered on rank 0
    assert len((tmp_path / "two" / "eval_samples.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.endswith(".log")) == \
        sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_killed_two_processes_resume_exactly(tmp_path, sharding):
    args = [*TINY, "--phase", "hybrid", "--steps", "5", "--save-every", "2", "--keep", "2"]  # 8 steps
    if sharding == "fsdp":
        args.append("--fsdp")
    out = tmp_path / "run"
    reference = Torchrun(tmp_path / "reference", args)
    first = Torchrun(out, args)
    first.wait_for_step(5)
    first.kill_group()
    killed_at, resumed_at = steps_logged(out), newest_checkpoint(out)
    assert 0 < resumed_at < 8

    log = Torchrun(out, [*args, "--resume"]).finish()
    reference.finish()
    assert f"resumed from {out / 'checkpoints'}" in log
    worst = compare_runs(tmp_path / "reference", out)
    print(f"{sharding}: killed after {killed_at} logged steps, resumed from checkpoint {resumed_at}; "
          f"max abs difference {worst}")


def test_uneven_batch_rejected(tmp_path):
    run = Torchrun(tmp_path / "run", [*TINY, "--phase", "rl", "--init", "unused", "--prompts-per-step", "3"])
    assert run.popen.wait(timeout=120) != 0
    log = run.log()
    assert "--prompts-per-step 3 does not divide evenly among 2 processes; use a multiple of 2" in log
    assert log.count("does not divide evenly") == 1  # printed by rank 0 only


def test_fsdp_needs_torchrun(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        train.main([*TINY, "--phase", "sft", "--fsdp", "--out", str(tmp_path / "run")])
    assert "--fsdp shards the model over the processes that torchrun starts" in str(raised.value.code)

"""Comparison tables: every method trained from the same starting model with the same budget.

    python -m eval.tables --data synthetic --seeds 3
    python -m eval.tables --data gsm8k,strategyqa,mathqa --data-root ../shared/data \\
        --init /path/to/Qwen2.5-1.5B --scale gpu --nproc-per-node 8

Methods, each one train.py run per (dataset, seed):

    sft                 plain SFT (--no-post-completion --phase sft)
    grpo                plain GRPO with accuracy and format rewards (--no-post-completion --phase rl)
    sft-grpo            plain SFT for half the budget, then plain GRPO
    pcl-sft             dual-track SFT (--phase sft)
    pcl-rl              dual-track SFT for half the budget, then white-box GRPO (--phase rl)
    pcl-hybrid          dual-track SFT for half the budget, then GRPO plus dual-track SFT in every
                        step (--phase hybrid)
    pcl-no-eval-track   pcl-hybrid without the evaluation track in either half: no graded answers,
                        no score regression
    pcl-no-consistency  pcl-hybrid with consistency reward weight 0 (--w-con 0)

The baselines (sft, grpo, sft-grpo) use the same prompts and answer tags as PCL; their sequence
ends with EOS after the answer, and their inference stops at EOS.

Starting model. All methods of a (dataset, seed) start from the same weights and tokenizer:
--init DIR when given, else a model trained here from random weights (drawn from the seed) with
--base-steps steps of plain SFT, the "start" row. A random model cannot do RL, and the methods are
meant to be compared as continued training of a model that already answers in the format, as a
pretrained language model does. The starting model has seen no post-completion text, so every PCL
method has to learn the marker and the evaluation within its budget, as it would when starting
from a pretrained model.

Cold start and learning rates. The PCL methods with RL spend the first half of their budget on
dual-track SFT, the same split as sft-grpo's: half SFT in the method's own format, then half RL.
GRPO alone would never sample the post-completion part that the consistency reward pays for. SFT
steps use --sft-lr and GRPO and hybrid steps --rl-lr, whatever the method, because on the cpu
scale one rate did not serve both: at the SFT rate GRPO and hybrid steps broke the small model's
answers, and at the RL rate the SFT part of a hybrid step learned the new tags too slowly
(RESULTS.md lists the runs). grpo needs no cold start because the starting model already writes
its format.

Budget. Every method gets --budget optimizer steps, and each step draws --prompts-per-step
training questions per training signal: P reasoning-track questions for SFT, P GRPO prompts with
--group-size samples each, and in PCL P graded answers for the evaluation track. A hybrid step has
both signals. The unit is optimizer steps rather than training tokens because tokens do not
measure the same thing across methods: GRPO spends tokens on G samples of each prompt, SFT on one
gold answer, and PCL also on the post-completion part. Equal tokens would give the RL methods far
fewer updates, and the PCL methods fewer than the baselines because their extra part costs tokens.
The learning-rate schedule counts steps too. The tables report what each cell trained on, in
steps per phase and in tokens, and its wall time, so that the budget can be checked.

Cells. Each run is a cell, in RESULTS/NAME/runs/DATA/METHOD/seed-K/, a train.py run directory with
train.log beside it. A cell is finished when its summary.json exists, and re-running the command
skips finished cells, after checking that they were trained with the same options. It resumes an
interrupted cell with train.py --resume. A cell that fails is logged and the others go on; running
the command again retries it. After each cell the command rewrites RESULTS/NAME/table.md
(mean and standard deviation over seeds, one row per method, one column group per dataset),
table.json (the same with the value of every seed, the options and the machine) and, when
matplotlib is installed, accuracy.png.
"""

import argparse
import json
import logging
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import train  # to resolve train.py's options; the runs themselves are separate processes
from data import DATASETS
from eval.metrics import SELF_EVALUATION_METRICS
from model.checkpoint import write_json

log = logging.getLogger("tables")

ROOT = Path(__file__).resolve().parent.parent  # the repository, where train.py is


@dataclass(frozen=True)
class Method:
    """Recipe of one method as train.py options, for a budget of N optimizer steps."""

    phase: str  # train.py --phase
    post_completion: bool
    cold_start: bool = False  # N // 2 SFT steps (train.py --warmup-steps), then N - N // 2 RL steps
    evaluation_track: bool = True  # with post_completion: graded answers in every SFT batch
    flags: tuple[str, ...] = ()  # further train.py options


METHODS = {
    "sft": Method("sft", post_completion=False),
    "grpo": Method("rl", post_completion=False),
    "sft-grpo": Method("rl", post_completion=False, cold_start=True),
    "pcl-sft": Method("sft", post_completion=True),
    "pcl-rl": Method("rl", post_completion=True, cold_start=True),
    "pcl-hybrid": Method("hybrid", post_completion=True, cold_start=True),
    # no graded answers in the SFT parts, so only the consistency reward teaches the evaluation
    "pcl-no-eval-track": Method("hybrid", post_completion=True, cold_start=True, evaluation_track=False,
                                flags=("--sample-every", "0", "--cold-start-examples", "0", "--lambda-eval", "0",
                                       "--lambda-score", "0")),
    "pcl-no-consistency": Method("hybrid", post_completion=True, cold_start=True, flags=("--w-con", "0")),
}
START = "start"  # the row of the starting model
TIMING = "timing.json"  # in a cell's folder: the wall time of its commands

# train.py options that the tables set, so that --train-args cannot change the budget or the methods
CONTROLLED = {"--phase", "--init", "--steps", "--warmup-steps", "--lr", "--warmup-lr", "--batch-size",
              "--prompts-per-step", "--group-size", "--eval-examples", "--eval-track-batch-size", "--post-completion",
              "--seed", "--data", "--data-dir", "--out", "--resume", "--dtype", "--device", "--keep", "--config"}

# Sizes per --scale; each flag of the same name overrides its value.
#   cpu: the synthetic task with 8 methods and 3 seeds on 2 CPU cores in about 90 minutes, from a
#        0.8M-parameter model trained here (RESULTS.md has the measured time).
#   gpu: for a pretrained --init model on GPUs, evaluated on the whole test splits.
# NOTE: the gpu sizes and learning rate are a guess for models of 1.5B to 8B parameters, and this
# scale has not been run.
SCALES = {
    "cpu": dict(budget=200, prompts_per_step=8, group_size=8, base_steps=1500, eval_examples=200, sft_lr=1e-3,
                rl_lr=1e-4, dtype="float32"),
    "gpu": dict(budget=500, prompts_per_step=32, group_size=8, base_steps=1500, eval_examples=0, sft_lr=1e-5,
                rl_lr=1e-6, dtype="bfloat16"),
}

# Metrics in the tables: summary.json key, column label, decimals.
COLUMNS = [
    ("accuracy", "acc", 3),
    ("format_rate", "format", 3),
    ("reward_prediction_accuracy", "RPA", 3),
    ("reward_mae", "MAE", 3),
    ("correctness_auroc", "AUROC", 3),
    ("correctness_ece", "ECE", 3),
    ("tokens_per_answer", "tok/ans", 1),
]


@dataclass
class Cell:
    """One run of the sweep: the starting model or one method, for one dataset and seed."""

    data: str
    method: str  # a key of METHODS, or START
    seed: int
    folder: Path
    command: list[str] = field(default_factory=list)  # the command that trains or evaluates it
    flags: list[str] = field(default_factory=list)  # its train.py options, when it is a train.py run

    @property
    def name(self) -> str:
        return f"{self.data}/{self.method}/seed-{self.seed}"

    @property
    def summary_path(self) -> Path:
        return self.folder / "summary.json"

    @property
    def finished(self) -> bool:
        return self.summary_path.is_file()


class SweepStopped(Exception):
    """A signal stopped a cell; the sweep stops too, and re-running it resumes."""


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Sizes left unset come from --scale; see the module docstring for the design.")
    p.add_argument("--data", default="synthetic",
                   help=f"comma-separated datasets, of {', '.join(DATASETS)} (default: synthetic)")
    p.add_argument("--data-root",
                   help="folder with one folder of files per real dataset, such as ../shared/data (needed for all "
                        "datasets but synthetic)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated methods, of {', '.join(METHODS)} (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 per method and dataset (default: 3)")
    p.add_argument("--name", help="results folder name (default: the datasets joined by '+')")
    p.add_argument("--results", default="results", help="parent folder of the results (default: results)")
    p.add_argument("--init",
                   help="Hugging Face model folder that every method starts from (default: a model trained here with "
                        "--base-steps steps of plain SFT, one per dataset and seed)")
    p.add_argument("--scale", choices=list(SCALES), default="cpu",
                   help="preset of the sizes below: cpu for the synthetic task on a few CPU cores, gpu for a "
                        "pretrained --init model on GPUs (default: cpu)")
    sizes = p.add_argument_group("sizes (default: from --scale)")
    sizes.add_argument("--budget", type=int,
                       help="optimizer steps per method (cpu: 200, gpu: 500); each step draws --prompts-per-step "
                            "training questions per training signal")
    sizes.add_argument("--prompts-per-step", type=int,
                       help="training questions per optimizer step: SFT batch, GRPO prompts and evaluation-track "
                            "answers each (cpu: 8, gpu: 32)")
    sizes.add_argument("--group-size", type=int, help="GRPO samples per prompt (cpu and gpu: 8)")
    sizes.add_argument("--base-steps", type=int,
                       help="plain SFT steps that train the starting model from random weights when there is no "
                            "--init (cpu and gpu: 1500)")
    sizes.add_argument("--eval-examples", type=int,
                       help="held-out rows evaluated per cell, 0 for all (cpu: 200, gpu: 0)")
    sizes.add_argument("--sft-lr", type=float,
                       help="peak learning rate of SFT steps, cold starts included, in every method (cpu: 1e-3, "
                            "gpu: 1e-5)")
    sizes.add_argument("--rl-lr", type=float,
                       help="peak learning rate of GRPO and hybrid steps in every method (cpu: 1e-4, gpu: 1e-6)")
    sizes.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (cpu: float32, gpu: bfloat16)")
    run = p.add_argument_group("running")
    run.add_argument("--train-args", default="",
                     help="further train.py options for every run, in one quoted string after '=', such as "
                          "--train-args=\"--kl-coef 0.01 --max-new-tokens 64\"")
    run.add_argument("--device", default="auto", help="train.py --device (default: auto)")
    run.add_argument("--nproc-per-node", type=int, default=1,
                     help="processes per run: above 1, each run starts under torchrun, data-parallel (default: 1)")
    run.add_argument("--keep-checkpoints", action="store_true",
                     help="keep the checkpoints of finished cells (default: delete them, keeping model/)")
    run.add_argument("--dry-run", action="store_true", help="print the command of every unfinished cell and exit")
    run.add_argument("--table-only", action="store_true", help="rewrite the tables from the finished cells and exit")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    args.argv = argv  # for the command line in the tables

    for key, value in SCALES[args.scale].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.data = split_list(p, args.data, DATASETS, "--data")
    args.methods = split_list(p, args.methods, list(METHODS), "--methods")
    for name, low in (("seeds", 1), ("budget", 1), ("prompts_per_step", 1), ("group_size", 2), ("base_steps", 1),
                      ("eval_examples", 0), ("nproc_per_node", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    for name in ("sft_lr", "rl_lr"):
        value = getattr(args, name)
        if not math.isfinite(value) or value <= 0:
            p.error(f"--{name.replace('_', '-')} must be a positive finite number, got {value}")
    if any(METHODS[m].cold_start for m in args.methods) and args.budget < 2:
        p.error(f"--budget must be at least 2 for methods that split it into SFT and RL, got {args.budget}")
    real = [d for d in args.data if d != "synthetic"]
    if real and not args.data_root:
        p.error(f"--data {','.join(real)} reads local files: pass --data-root, the folder with one folder per dataset")
    for name in real:
        if not (Path(args.data_root) / name).is_dir():
            p.error(f"--data-root {args.data_root}: no folder {name}/ in it")
    if args.init and not Path(args.init).is_dir():
        p.error(f"--init {args.init}: folder not found")
    try:
        args.train_args = shlex.split(args.train_args)
    except ValueError as e:
        p.error(f"--train-args: {e}")
    controlled = sorted({flag for flag in (option_name(word) for word in args.train_args) if flag in CONTROLLED})
    if controlled:
        p.error(f"--train-args: {', '.join(controlled)} are set by the tables for every run (see --budget, "
                "--sft-lr, --rl-lr, --scale and the method definitions); leave them out")
    args.name = args.name or "+".join(args.data)
    return args


def option_name(word: str) -> str | None:
    """Return the option that a command-line word sets, as "--name": "--no-x" and "--x=1" give "--x"."""
    if not word.startswith("--"):
        return None
    name = word.split("=", 1)[0]
    return "--" + name[len("--no-"):] if name.startswith("--no-") else name


def split_list(p: argparse.ArgumentParser, text: str, choices, flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in choices]
    if unknown or not items:
        p.error(f"{flag}: unknown or missing names {unknown or [text]}; choose from {', '.join(choices)}")
    if len(set(items)) != len(items):
        p.error(f"{flag}: a name is listed twice in {text!r}")
    return items


# ---------------------------------------------------------------------------------------------
# the cells and their commands


def plan_cells(args) -> list[Cell]:
    """Return the sweep's cells in running order: per seed and dataset, the starting model first."""
    results = Path(args.results).resolve() / args.name
    cells = []
    for seed in range(args.seeds):
        for data in args.data:
            start = Cell(data, START, seed, results / "runs" / data / START / f"seed-{seed}")
            if args.init:
                start.command = evaluate_command(args, data, seed, start.summary_path)
            else:
                start.flags = start_flags(args, data, seed, start.folder)
                start.command = train_command(args, start.flags)
            cells.append(start)
            init = Path(args.init).resolve() if args.init else start.folder / "model"
            for method in args.methods:
                cell = Cell(data, method, seed, results / "runs" / data / method / f"seed-{seed}")
                cell.flags = method_flags(args, METHODS[method], data, seed, init, cell.folder)
                cell.command = train_command(args, cell.flags)
                cells.append(cell)
    return cells


def data_flags(args, data: str) -> list[str]:
    flags = ["--data", data]
    if data != "synthetic":
        flags += ["--data-dir", str((Path(args.data_root) / data).resolve())]
    return flags


def start_flags(args, data: str, seed: int, out: Path) -> list[str]:
    """train.py options of the starting model: plain SFT from random weights, train.py's defaults otherwise."""
    return ["--phase", "sft", "--no-post-completion", "--steps", str(args.base_steps), *data_flags(args, data),
            "--seed", str(seed), "--eval-examples", str(args.eval_examples), "--dtype", args.dtype,
            "--device", args.device, "--keep", "1", *args.train_args, "--out", str(out)]


def method_flags(args, method: Method, data: str, seed: int, init: Path, out: Path) -> list[str]:
    """train.py options of one method's cell."""
    budget = args.budget
    warmup = budget // 2 if method.cold_start else 0
    lr = args.sft_lr if method.phase == "sft" else args.rl_lr
    flags = ["--phase", method.phase, "--init", str(init), *data_flags(args, data), "--seed", str(seed),
             "--steps", str(budget - warmup), "--warmup-steps", str(warmup), "--lr", str(lr),
             "--warmup-lr", str(args.sft_lr), "--batch-size", str(args.prompts_per_step),
             "--prompts-per-step", str(args.prompts_per_step), "--group-size", str(args.group_size),
             "--eval-examples", str(args.eval_examples), "--dtype", args.dtype, "--device", args.device,
             "--keep", "1"]
    if method.post_completion:
        flags += ["--eval-track-batch-size", str(args.prompts_per_step if method.evaluation_track else 0)]
    else:
        flags += ["--no-post-completion"]
    # the method's own options come last, so that --train-args cannot change what defines it
    return [*flags, *args.train_args, *method.flags, "--out", str(out)]


def train_command(args, flags: list[str]) -> list[str]:
    if args.nproc_per_node > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(args.nproc_per_node)]
    else:
        launcher = [sys.executable]
    return [*launcher, str(ROOT / "train.py"), *flags]


def train_options(flags: list[str]) -> dict:
    """Return the options that train.py resolves from `flags`, without its warnings, which the
    cell's own train.log shows."""
    logger = logging.getLogger("train")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return vars(train.parse_args(flags))
    finally:
        logger.setLevel(level)


def evaluate_command(args, data: str, seed: int, out: Path) -> list[str]:
    """Return the command that evaluates an --init starting model, with the length limit that the methods use."""
    resolved = train_options([*data_flags(args, data), *args.train_args])
    command = [sys.executable, "-m", "eval.evaluate", "--checkpoint", str(Path(args.init).resolve()),
               *data_flags(args, data), "--no-post-completion", "--seed", str(seed),
               "--max-new-tokens", str(resolved["max_new_tokens"]), "--batch-size", str(resolved["eval_batch_size"]),
               "--device", args.device, "--dtype", args.dtype, "--out", str(out)]
    if args.eval_examples:
        command += ["--limit", str(args.eval_examples)]
    return command


def option_mismatch(cell: Cell) -> str | None:
    """Describe how a finished train.py cell's options differ from the options it would get now."""
    if not cell.flags:
        return None
    path = cell.folder / "run_config.json"
    if not path.is_file():
        return f"{path.name} is missing, so its options are unknown"
    saved = json.loads(path.read_text())
    differences = train.option_differences(saved, train_options(cell.flags))
    return "; ".join(differences) or None


# ---------------------------------------------------------------------------------------------
# running


def run_cell(args, cell: Cell) -> bool:
    """Train or evaluate one cell, resuming an interrupted train.py run; returns whether it finished."""
    cell.folder.mkdir(parents=True, exist_ok=True)
    command = list(cell.command)
    if cell.flags and (cell.folder / "run_config.json").is_file():
        command.append("--resume")
    log_path = cell.folder / "train.log"
    started = time.time()
    with open(log_path, "a") as log_file:
        log_file.write(f"\n$ {shlex.join(command)}\n")
        log_file.flush()
        try:
            code = run_and_wait(command, log_file)
        finally:
            # an interrupted cell's time counts too, since resuming it does not repeat that work
            write_json(cell.folder / TIMING, {"wall_seconds": (cell_wall_seconds(cell) or 0.0) + time.time() - started})
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM):
        raise SweepStopped(f"{cell.name} was stopped by a signal; run the same command again to resume it")
    if code != 0 or not cell.finished:
        tail = log_path.read_text().splitlines()[-5:]
        log.error("%s failed with exit code %s; the last lines of %s:\n  %s\nRun the same command again to retry "
                  "it.", cell.name, code, log_path, "\n  ".join(tail))
        return False
    if not args.keep_checkpoints:
        shutil.rmtree(cell.folder / "checkpoints", ignore_errors=True)
    return True


def run_and_wait(command: list[str], log_file) -> int:
    """Run `command` with its output in `log_file` and return its exit code. SIGTERM is passed on to
    it, and after Ctrl-C, which it gets too, the wait goes on, so that train.py can save a checkpoint."""
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum))
    try:
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                continue  # the child got the same SIGINT and stops after its current step
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_sweep(args, cells: list[Cell]) -> list[Cell]:
    """Run every unfinished cell in order; returns the cells that failed or were left out."""
    failed = []
    started = time.time()
    for number, cell in enumerate(cells, 1):
        if cell.finished:
            log.info("[%d/%d] %s: finished, skipped", number, len(cells), cell.name)
            continue
        start_cell = next(c for c in cells if c.data == cell.data and c.seed == cell.seed and c.method == START)
        if cell is not start_cell and not args.init and not start_cell.finished:
            log.error("[%d/%d] %s: left out, because its starting model %s did not finish", number, len(cells),
                      cell.name, start_cell.name)
            failed.append(cell)
            continue
        log.info("[%d/%d] %s: running (log: %s)", number, len(cells), cell.name, cell.folder / "train.log")
        t0 = time.time()
        if run_cell(args, cell):
            metrics = read_metrics(cell)
            log.info("[%d/%d] %s: done in %.0f s, accuracy %.3f (sweep so far %.0f s)", number, len(cells),
                     cell.name, time.time() - t0, metrics["accuracy"], time.time() - started)
        else:
            failed.append(cell)
        write_tables(args, cells, time.time() - started)
    return failed


# ---------------------------------------------------------------------------------------------
# tables


def read_metrics(cell: Cell) -> dict:
    """Return the held-out metrics of a finished cell: train.py's summary.json, or the "metrics" of
    an eval.evaluate result for an --init starting model."""
    content = json.loads(cell.summary_path.read_text())
    return content.get("metrics", content)


def cell_wall_seconds(cell: Cell) -> float | None:
    """Return the wall time that the cell's commands took, summed over the invocations that ran
    them, process start-up and evaluation included; None for a cell finished by other means."""
    path = cell.folder / TIMING
    return json.loads(path.read_text())["wall_seconds"] if path.is_file() else None


def training_used(cell: Cell) -> dict:
    """Return the steps per phase, the tokens trained on and the wall time of a finished train.py cell."""
    steps, tokens = {}, 0
    metrics_path = cell.folder / "metrics.jsonl"
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            record = json.loads(line)
            steps[record["phase"]] = steps.get(record["phase"], 0) + 1
            tokens += record.get("tokens", 0)
    return {"steps": steps, "tokens": tokens}


def aggregate(values: list[float | None]) -> dict:
    """Mean and sample standard deviation (n - 1) of the values that exist; None when none do."""
    present = [v for v in values if v is not None]
    return {"mean": statistics.fmean(present) if present else None,
            "std": statistics.stdev(present) if len(present) > 1 else None,
            "n": len(present), "values": values}


def build_table(args, cells: list[Cell]) -> dict:
    """Return {data: {method: {metric: aggregate}}} over the finished cells, and per-cell records."""
    table, records = {}, []
    rows = [START, *args.methods]
    for data in args.data:
        table[data] = {}
        for method in rows:
            mine = [c for c in cells if c.data == data and c.method == method]
            finished = [c for c in mine if c.finished]
            metrics = {c.seed: read_metrics(c) for c in finished}
            entry = {key: aggregate([metrics[c.seed].get(key) if c.seed in metrics else None for c in mine])
                     for key, _, _ in COLUMNS}
            entry["seeds_finished"] = len(finished)
            table[data][method] = entry
            for c in mine:
                record = {"data": data, "method": method, "seed": c.seed, "folder": str(c.folder),
                          "finished": c.finished, "metrics": metrics.get(c.seed)}
                if c.finished and c.flags:
                    record.update(training_used(c))
                if c.finished:
                    record["wall_seconds"] = cell_wall_seconds(c)
                records.append(record)
    return {"table": table, "cells": records}


def format_entry(entry: dict, key: str, decimals: int, seeds: int, applies: bool) -> str:
    """Format one table cell as mean ± std, with the count of finished seeds when it is short of `seeds`.

    A cell that no seed finished shows "—". A metric that does not apply to the method shows "n/a",
    and one that no finished seed could compute shows "none".
    """
    if entry["seeds_finished"] == 0:
        return "—"
    metric = entry[key]
    if metric["mean"] is None:
        return "none" if applies else "n/a"
    text = f"{metric['mean']:.{decimals}f}"
    if metric["std"] is not None:
        text += f" ± {metric['std']:.{decimals}f}"
    if metric["n"] < seeds:
        text += f" ({metric['n']}/{seeds} seeds)"
    return text


def tokens_ratios(built: dict, data: str) -> dict[str, float]:
    """Return each method's mean tokens per answer divided by sft's, when both exist."""
    rows = built["table"][data]
    reference = rows.get("sft", {}).get("tokens_per_answer", {}).get("mean")
    if not reference:
        return {}
    return {method: entry["tokens_per_answer"]["mean"] / reference for method, entry in rows.items()
            if entry["tokens_per_answer"]["mean"] is not None}


def markdown(args, built: dict, command: str, wall_seconds: float) -> str:
    seeds = args.seeds
    cells_minutes = sum(c.get("wall_seconds") or 0.0 for c in built["cells"]) / 60
    lines = [f"# {args.name}", "",
             f"Mean ± standard deviation over seeds 0 to {seeds - 1} (n − 1 in the denominator). A cell with "
             "fewer finished seeds says how many, and `—` marks one with none. `n/a` marks a metric that does not "
             "apply, since the models without post-completion write no self-evaluation. `none` marks one that no "
             "seed could compute, such as MAE without a parsable predicted reward or AUROC when every answer was "
             "right.", "",
             f"Budget: {args.budget} optimizer steps per method, {args.prompts_per_step} training questions per "
             f"step and training signal, {args.group_size} GRPO samples per question, learning rate "
             f"{args.sft_lr:g} in SFT steps and {args.rl_lr:g} in GRPO and hybrid steps. "
             + (f"Starting model: {args.init}." if args.init else
                f"Starting model (`start`): {args.base_steps} plain SFT steps from random weights, one per dataset "
                "and seed."), "",
             f"Command: `{command}`", "",
             f"Wall time of this invocation: {wall_seconds / 60:.1f} min, which cells skipped as finished take "
             f"no part in. The cells' own wall times add up to {cells_minutes:.1f} min.", ""]

    header = ["method"] + [f"{data} {label}" for data in args.data for _, label, _ in COLUMNS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in [START, *args.methods]:
        row = [method]
        for data in args.data:
            entry = built["table"][data][method]
            for key, _, decimals in COLUMNS:
                applies = key not in SELF_EVALUATION_METRICS or (method != START and METHODS[method].post_completion)
                row.append(format_entry(entry, key, decimals, seeds, applies))
        lines.append("| " + " | ".join(row) + " |")

    lines += ["", "Columns: acc = accuracy, format = format rate, RPA = reward-prediction accuracy, MAE = mean "
              "absolute error of the predicted reward, AUROC and ECE = of the predicted probability of a right "
              "answer, tok/ans = tokens generated per answer, its stop token included.", ""]
    for data in args.data:
        ratios = tokens_ratios(built, data)
        if ratios:
            text = ", ".join(f"{m} {100 * (r - 1):+.1f}%" for m, r in ratios.items() if m != "sft")
            lines.append(f"Tokens per answer on {data} relative to sft: {text}.")
    lines += ["", "## Training each cell used", "",
              "Mean over the finished seeds: optimizer steps per phase, tokens trained on (prompts included), and "
              "wall time of the cell's commands, process start-up and held-out evaluation included.", "",
              "| data | method | steps | tokens | wall time (s) |", "|---|---|---|---|---|"]
    for data in args.data:
        for method in [START, *args.methods]:
            used = [c for c in built["cells"] if c["data"] == data and c["method"] == method and "steps" in c]
            if not used:
                continue
            phases = sorted({phase for c in used for phase in c["steps"]})
            steps = ", ".join(f"{phase} {statistics.fmean(c['steps'].get(phase, 0) for c in used):g}"
                              for phase in phases)
            tokens = statistics.fmean(c["tokens"] for c in used)
            walls = [c["wall_seconds"] for c in used if c.get("wall_seconds") is not None]
            wall = f"{statistics.fmean(walls):.0f}" if walls else "—"
            lines.append(f"| {data} | {method} | {steps} | {tokens:,.0f} | {wall} |")
    return "\n".join(lines) + "\n"


def machine() -> dict:
    """Describe the machine that ran the sweep, for table.json."""
    processor = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                processor = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: keep what platform reports
    info = {"platform": platform.platform(), "processor": processor, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1)
    except (ValueError, OSError, AttributeError):
        pass  # sysconf names are not available on every system
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def write_tables(args, cells: list[Cell], wall_seconds: float):
    """Write table.md, table.json and, with matplotlib, accuracy.png from the finished cells."""
    folder = Path(args.results) / args.name
    folder.mkdir(parents=True, exist_ok=True)
    built = build_table(args, cells)
    command = shlex.join(["python", "-m", "eval.tables", *args.argv])
    content = {"name": args.name, "command": command, "machine": machine(), "wall_seconds": wall_seconds,
               "budget_unit": "optimizer steps, each drawing --prompts-per-step training questions per training "
                              "signal",
               "options": {key: getattr(args, key) for key in ("data", "methods", "seeds", "init", "scale", "budget",
                                                               "prompts_per_step", "group_size", "base_steps",
                                                               "eval_examples", "sft_lr", "rl_lr", "dtype",
                                                               "train_args")},
               "tokens_per_answer_vs_sft": {data: tokens_ratios(built, data) for data in args.data},
               **built}
    write_json(folder / "table.json", content)
    (folder / "table.md").write_text(markdown(args, built, command, wall_seconds))
    plot_accuracy(args, built, folder / "accuracy.png")


_logged_no_matplotlib = False  # the missing matplotlib is logged once per process


def plot_accuracy(args, built: dict, path: Path) -> bool:
    """Draw mean accuracy per method, one group of bars per dataset, with the standard deviation as
    error bars. Returns False, and draws nothing, when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        global _logged_no_matplotlib
        if not _logged_no_matplotlib:
            log.info("matplotlib is not installed, so %s is not drawn (pip install matplotlib)", path)
            _logged_no_matplotlib = True
        return False

    rows = [START, *args.methods]
    width = 0.8 / len(rows)
    figure, axes = plt.subplots(figsize=(4.0 + 0.5 * len(args.data) * len(rows), 4.0))
    for i, method in enumerate(rows):
        entries = [built["table"][data][method]["accuracy"] for data in args.data]
        means = [math.nan if e["mean"] is None else e["mean"] for e in entries]  # NaN: no bar for no result
        errors = [e["std"] or 0.0 for e in entries]
        positions = [d + (i - (len(rows) - 1) / 2) * width for d in range(len(args.data))]
        axes.bar(positions, means, width, yerr=errors, capsize=2, label=method)

    axes.set_xticks(range(len(args.data)), args.data)
    axes.set_ylabel("accuracy")
    axes.set_ylim(0, 1)
    seeds = f"{args.seeds} seeds" if args.seeds > 1 else "1 seed"
    axes.set_title(f"{args.name}: accuracy by method, mean ± std over {seeds}")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


# ---------------------------------------------------------------------------------------------


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    cells = plan_cells(args)

    # a finished cell trained with other options would make its row mix two budgets
    for cell in cells:
        mismatch = cell.finished and option_mismatch(cell)
        if mismatch:
            sys.exit(f"error: {cell.name} in {cell.folder} was trained with other options: {mismatch}. Use another "
                     "--name, or delete that folder to train it again")

    if args.table_only:
        write_tables(args, cells, 0.0)
        log.info("wrote %s", Path(args.results) / args.name / "table.md")
        return
    if args.dry_run:
        for cell in cells:
            if not cell.finished:
                resume = ["--resume"] if cell.flags and (cell.folder / "run_config.json").is_file() else []
                print(shlex.join([*cell.command, *resume]))
        return

    started = time.time()
    try:
        failed = run_sweep(args, cells)
    except SweepStopped as e:
        write_tables(args, cells, time.time() - started)
        sys.exit(f"stopped: {e}")
    wall_seconds = time.time() - started
    write_tables(args, cells, wall_seconds)
    log.info("wrote %s in %.1f min", Path(args.results) / args.name / "table.md", wall_seconds / 60)
    if failed:
        sys.exit(f"error: {len(failed)} cells did not finish: {', '.join(c.name for c in failed)}; run the same "
                 "command again to retry them")


if __name__ == "__main__":
    main()

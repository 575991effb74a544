"""Post-Completion Learning trainer: dual-track SFT, white-box GRPO, or both at once (hybrid).

    python train.py --phase hybrid                  # synthetic task, small model created here
    python train.py --phase sft --data gsm8k --data-dir ../shared/data/gsm8k --init MODEL_DIR

    python train.py --resume --out runs/default      # continue a stopped run from its last checkpoint

    torchrun --standalone --nproc_per_node 8 train.py --phase hybrid   # data-parallel, one GPU each

Under torchrun every process draws the same global batch and trains on its own contiguous part
of it (whole GRPO groups), so a run gives the results of one process with the same options, up to
rounding; see distributed.py. Only rank 0 logs and writes files.

Without --init the model starts from random weights, so the rl and hybrid phases first run
--warmup-steps dual-track SFT steps: GRPO needs a policy that already writes the format. With
--init they run them only when --warmup-steps is given.

--no-post-completion trains the baselines that PCL is compared with: the same prompt and answer
tags, the sequence ends with EOS right after the answer, there is no evaluation track and no
consistency reward, and inference stops at EOS. Its SFT, the warm-up's too, is the reasoning
track alone.

Outputs in --out: run_config.json, metrics.jsonl (one JSON object per step), summary.json,
eval_samples.jsonl, the tokenizer, the final model in model/ (HF layout), and checkpoints/
(see train_state.py). SIGINT or SIGTERM stops the run after the current step and a checkpoint.
"""

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import random
import re
import shlex
import signal
import sys
import threading
import time
import tomllib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

import distributed
from data import DATASETS, MAX_NEW_TOKENS, DataError, Row, RowError, format_prompt, load_rows
from eval.evaluate import answer_and_grade
from eval.metrics import summarize
from model.checkpoint import atomic_write, load_model_and_tokenizer, save_pretrained, write_json
from model.config import PRESETS, ModelConfig
from model.generate import generate, row_key
from model.tokenizer import Tokenizer, train_tokenizer
from model.transformer import Transformer
from pcl import rewards
from pcl.grpo import GRPOConfig, collect_rollouts, grpo_backward, micro_batches, rollout_stats, white_box_reward_fns
from pcl.losses import KL_ESTIMATORS, LOSS_AGGREGATIONS
from pcl.sequence import prompt_ids, reasoning_track
from pcl.sft import EvaluationTrack, ScoreHead, SFTConfig, gold_completion, sft_backward
from distributed import Dist
from train_state import (STATE_FORMAT, Checkpoint, CheckpointError, CheckpointStore, load_optimizer_state,
                         optimizer_state, optimizer_state_dict, rng_state, set_rng_state)

log = logging.getLogger("train")


# Options whose default depends on the dataset. The synthetic task's values make the default run
# finish in minutes on two CPU cores; the real datasets have much longer answers, and a model trained
# there from scratch is a smoke test, so their warm-up is short.
DATASET_DEFAULTS = {
    "synthetic": dict(warmup_steps=1500, max_new_tokens=MAX_NEW_TOKENS["synthetic"]),
    "gsm8k": dict(warmup_steps=100, max_new_tokens=MAX_NEW_TOKENS["gsm8k"]),
    "strategyqa": dict(warmup_steps=100, max_new_tokens=MAX_NEW_TOKENS["strategyqa"]),
    "mathqa": dict(warmup_steps=100, max_new_tokens=MAX_NEW_TOKENS["mathqa"]),
}

# Options that may differ between a run and its resumption. None changes what a step computes:
# where the run lives, how often it logs and saves, how many checkpoints it keeps, and after how
# many non-finite updates it gives up. The device is here too, so that a run stopped on one
# machine can go on on another. A different device type computes the same steps with different
# rounding, so resuming on one logs a warning that the results are no longer bit-identical.
RESUME_MAY_CHANGE = {"out", "resume", "config", "log_every", "save_every", "keep", "max_bad_steps", "device", "fsdp"}

# ---------------------------------------------------------------------------------------------
# command line


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors about an option set in the --config file name its file and line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_sources = {}  # option string -> "--config FILE, line N", for options the file sets

    def error(self, message):
        for flag, where in self.config_sources.items():
            if re.search(rf"{re.escape(flag)}(?![\w-])", message):
                message = f"{message} (set in {where})"
                break
        super().error(message)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the None and False of options whose help explains their default."""

    def _get_help_string(self, action):
        # identity, not ==: a default of 0 equals False but should be shown
        if any(action.default is hidden for hidden in (None, False, argparse.SUPPRESS)):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="TOML file setting any of the options below (dashes or underscores); "
                                    "command-line flags override it")
    run = p.add_argument_group("run")
    run.add_argument("--phase", choices=["sft", "rl", "hybrid"], default="hybrid",
                     help="sft: dual-track SFT; rl: GRPO with white-box rewards; hybrid: GRPO + lambda_sft * SFT each step")
    run.add_argument("--post-completion", action=argparse.BooleanOptionalAction, default=True,
                     help="train with the post-completion part; --no-post-completion trains a baseline whose "
                          "sequence ends with EOS after the answer, without evaluation track or consistency "
                          "reward, and whose inference stops at EOS")
    run.add_argument("--out", default="runs/default", help="run directory for outputs")
    run.add_argument("--steps", type=int, default=5,
                     help="steps of the requested phase: optimizer updates in sft, batches of rollouts (each with "
                          "--inner-steps updates) in rl and hybrid")
    run.add_argument("--seed", type=int, default=0, help="seed for data order, initialisation and sampling")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    run.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                     help="compute dtype (bfloat16 runs under autocast; weights and optimizer state stay float32)")
    run.add_argument("--fsdp", action="store_true",
                     help="under torchrun, shard weights, gradients and optimizer state over the processes with "
                          "FSDP2 (fully_shard per transformer block), for models whose training state does not "
                          "fit one device (default: every process has all of it, DistributedDataParallel)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                     help="torch.compile the fused losses: score regression and chunked cross-entropy (falls back to "
                          "eager with a warning where compilation is unavailable)")
    run.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=False,
                     help="torch.compile the decode step of rollouts and of the evaluation track's samples "
                          "(model.generate); off by default because its rounding differs from eager, which changes "
                          "the sampled ids and so the default run's results (BENCHMARKS.md has its speed)")
    run.add_argument("--compile-layers", action=argparse.BooleanOptionalAction, default=False,
                     help="torch.compile each decoder layer of the forward passes without a KV cache: training, the "
                          "reference model and the held-out evaluation's reward probabilities (generation keeps its "
                          "own setting, --compile-decode); off by default because its rounding differs from eager, "
                          "which changes the default run's results (BENCHMARKS.md has its speed)")
    run.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its newest usable checkpoint; options not given take "
                          "the values in its run_config.json, and a given option that changes the results must "
                          "match it")
    run.add_argument("--save-every", type=int, default=200,
                     help="optimizer steps between checkpoints in OUT/checkpoints, which also get one at the end of "
                          "each stage and on SIGINT or SIGTERM (0: only those); a checkpoint due right after a "
                          "skipped non-finite update is left out")
    run.add_argument("--keep", type=int, default=3, help="newest checkpoints kept")
    run.add_argument("--max-bad-steps", type=int, default=10,
                     help="stop the run with an error after this many optimizer updates in a row whose loss or "
                          "gradient norm is not finite (each of them is skipped)")

    data = p.add_argument_group("data")
    data.add_argument("--data", choices=DATASETS, default="synthetic", help="dataset")
    data.add_argument("--data-dir", help="folder with the dataset files (all datasets but synthetic)")
    data.add_argument("--train-examples", type=int, help="use only the first N training rows")
    data.add_argument("--eval-examples", type=int, default=200, help="held-out rows evaluated at the end (0: all)")
    data.add_argument("--eval-batch-size", type=int, default=100, help="rows generated together at evaluation")
    data.add_argument("--skip-bad-rows", action="store_true",
                      help="skip invalid dataset rows, log the first ones, and report their count in summary.json "
                           "(default: stop at the first invalid row)")

    model = p.add_argument_group("model")
    model.add_argument("--init", help="HF model folder to start from (config.json, safetensors, tokenizer.json)")
    model.add_argument("--preset", choices=list(PRESETS), default="small", help="model shape when starting from scratch")
    model.add_argument("--vocab-size", type=int, default=2048,
                       help="largest vocabulary of the tokenizer trained when starting from scratch")

    opt = p.add_argument_group("optimization")
    opt.add_argument("--lr", type=float,
                     help="peak learning rate of the requested phase (default: --warmup-lr for sft without "
                          "--init, else 2e-5)")
    opt.add_argument("--warmup-steps", type=int,
                     help="SFT steps run before rl or hybrid, with their own learning-rate schedule "
                          "(default: without --init 1500 on synthetic and 100 on the other datasets; with "
                          "--init 0)")
    opt.add_argument("--warmup-lr", type=float, default=3e-3, help="peak learning rate of those warm-up SFT steps")
    opt.add_argument("--lr-warmup", type=int, default=10, help="steps of linear learning-rate warm-up per stage")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    opt.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm to this (0: off)")

    sft = p.add_argument_group("dual-track SFT")
    sft.add_argument("--batch-size", type=int, default=16, help="reasoning-track sequences per step")
    sft.add_argument("--eval-track-batch-size", type=int, default=16,
                     help="evaluation-track sequences per step")
    sft.add_argument("--lambda-eval", type=float, default=1.0, help="weight of the evaluation-track cross-entropy")
    sft.add_argument("--lambda-score", type=float, default=1.0, help="weight of the score-regression loss")
    sft.add_argument("--lambda-sft", type=float, default=1.0, help="weight of the SFT loss in hybrid steps")
    sft.add_argument("--pool-size", type=int, default=128,
                     help="newest evaluation-track examples kept; small enough that the pool follows the model")
    sft.add_argument("--balance-eval-track", action="store_true",
                     help="draw evaluation-track batches half from right and half from wrong answers "
                          "(default: at the ratio of the pool, which summary.json reports)")
    sft.add_argument("--cold-start-examples", type=int, default=64,
                     help="training rows whose gold and corrupted completions seed the evaluation track")
    sft.add_argument("--sample-every", type=int, default=5,
                     help="in sft and hybrid steps: answer training prompts with the model every N steps and add "
                          "the graded answers to the evaluation track (0: cold-start data only)")
    sft.add_argument("--eval-track-samples", type=int, default=16, help="training prompts answered per refresh")
    sft.add_argument("--eval-track-temperature", type=float, default=0.0,
                     help="sampling temperature of those answers; 0 (greedy) grades what the model answers at "
                          "inference, where its self-evaluation is measured")
    sft.add_argument("--eval-track-from-rollouts", action="store_true",
                     help="in hybrid steps, also add every GRPO rollout to the evaluation track")

    rl = p.add_argument_group("GRPO")
    rl.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    rl.add_argument("--prompts-per-step", type=int, default=8, help="prompts per optimizer step")
    rl.add_argument("--max-new-tokens", type=int,
                    help="length limit in tokens of every generated completion: rollouts (post-completion part "
                         "included), evaluation-track answers and held-out answers (default: 96 on synthetic, "
                         "256 on strategyqa, 320 on gsm8k and mathqa)")
    rl.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of rollouts")
    rl.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold of rollouts")
    rl.add_argument("--inner-steps", type=int, default=1,
                    help="optimizer updates per batch of rollouts; the importance ratio departs from 1, and "
                         "clipping acts, from the second one on")
    rl.add_argument("--micro-batch-size", type=int, default=0,
                    help="rows per forward pass, GRPO and SFT alike (0: the whole batch); the gradient does not "
                         "depend on it")
    rl.add_argument("--clip-low", type=float, default=0.2, help="PPO clip: the ratio is clipped below at 1 - this")
    rl.add_argument("--clip-high", type=float, default=0.2,
                    help="PPO clip: the ratio is clipped above at 1 + this (above --clip-low: DAPO's clip-higher)")
    rl.add_argument("--kl-coef", type=float, default=0.04, help="weight of the KL penalty to the frozen reference")
    rl.add_argument("--kl-estimator", choices=KL_ESTIMATORS, default="k3",
                    help="estimator of KL(policy || reference) on the sampled tokens, d = log p_ref - log p: "
                         "k1 = -d, k3 = exp(d) - d - 1")
    rl.add_argument("--kl-on-flat-groups", action=argparse.BooleanOptionalAction, default=True,
                    help="give the KL term to groups whose rewards are all equal (advantage 0); without it such "
                         "groups get no gradient at all")
    rl.add_argument("--loss-agg", choices=list(LOSS_AGGREGATIONS), default="token-mean",
                    help="how the GRPO token losses of a step are averaged: " +
                         "; ".join(f"{k}: {v}" for k, v in LOSS_AGGREGATIONS.items()))
    rl.add_argument("--mask-truncated", action="store_true",
                    help="leave completions cut by --max-new-tokens out of the GRPO loss and its normaliser")
    rl.add_argument("--scale-rewards", action=argparse.BooleanOptionalAction, default=True,
                    help="divide advantages by the group's reward standard deviation")
    rl.add_argument("--split-advantage", action="store_true",
                    help="tokens up to the marker get the advantage of accuracy + format, tokens after it "
                         "the advantage of consistency (default: all get the advantage of the total reward)")

    rw = p.add_argument_group("rewards")
    rw.add_argument("--w-acc", type=float, default=1.0, help="weight of the accuracy reward")
    rw.add_argument("--w-fmt", type=float, default=1.0, help="weight of the format reward")
    rw.add_argument("--w-con", type=float, default=1.0, help="weight of the consistency reward")
    rw.add_argument("--graded-consistency", action="store_true",
                    help="consistency reward 1 - |r_hat - r| / r_max instead of exact match")
    rw.add_argument("--max-evaluation-tokens", type=int, default=48,
                    help="length limit in tokens of the post-completion part generated at evaluation")

    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.config:
        # the file's options are parsed as flags placed before the command line's, so they get the
        # same type and choice checks, and the command line wins
        command_line = argv
        argv = config_file_flags(p, args.config) + argv
        for flag in list(p.config_sources):  # an option on the command line overrides the file's
            if any(a == flag or a.startswith(flag + "=") for a in command_line):
                del p.config_sources[flag]
        args = p.parse_args(argv)
    if args.resume:
        args = resumed_options(p, args, argv)
    if not args.post_completion:
        warn_no_post_completion(explicit_options(p, argv))
    if args.warmup_steps is None and args.init:
        args.warmup_steps = 0  # a loaded model is expected to write the format already
    for key, value in DATASET_DEFAULTS[args.data].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.lr is None:
        args.lr = args.warmup_lr if args.phase == "sft" and not args.init else 2e-5
    check_args(p, args)
    return args


def config_file_flags(p: argparse.ArgumentParser, path: str) -> list[str]:
    """Turn a TOML file of option = value lines into the equivalent command-line flags."""
    try:
        source = Path(path).read_bytes().decode("utf-8")
        options = tomllib.loads(source)
    except OSError as e:
        p.error(f"--config {path}: cannot read the file ({e.strerror})")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        p.error(f"--config {path}: invalid TOML: {e}")
    actions = {a.dest: a for a in p._actions if a.option_strings and a.dest not in ("help", "config")}
    lines = source.splitlines()
    flags, seen = [], {}
    for key, value in options.items():
        action = actions.get(key.replace("-", "_"))
        where = f"--config {path}, line {config_line(lines, key)}"
        if action is None:
            p.error(f"{where}: unknown option {key!r}; see --help for the options")
        if action.dest in seen:
            p.error(f"{where}: {seen[action.dest]!r} and {key!r} set the same option; keep one of them")
        seen[action.dest] = key
        is_switch = action.nargs == 0
        if is_switch != isinstance(value, bool):
            expected = "true or false" if is_switch else "a value, not true or false"
            p.error(f"{where}: invalid value {value!r} for {key!r}: expected {expected}")
        if isinstance(value, (list, dict)):
            p.error(f"{where}: invalid value {value!r} for {key!r}: expected a single value, not a list or table")
        if is_switch:
            if value:
                flags.append(action.option_strings[0])
            elif isinstance(action, argparse.BooleanOptionalAction):
                flags.append(action.option_strings[1])  # the --no- form
            p.config_sources[action.option_strings[0]] = where
            continue
        text = str(value)
        try:
            converted = action.type(text) if action.type is not None else text
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            type_name = getattr(action.type, "__name__", "value")
            p.error(f"{where}: invalid value {value!r} for {key!r}: expected {type_name}")
        if action.choices is not None and converted not in action.choices:
            p.error(f"{where}: invalid value {value!r} for {key!r}: expected one of "
                    f"{', '.join(map(str, action.choices))}")
        flags.append(f"{action.option_strings[0]}={text}")  # with "=", a value that starts with "-" stays a value
        p.config_sources[action.option_strings[0]] = where
    return flags


def config_line(lines: list[str], key: str) -> int | str:
    """Return the 1-based number of the line that sets `key` in a TOML file, or "?" if none does."""
    pattern = re.compile(rf"""^\s*["']?{re.escape(key)}["']?\s*=""")
    for number, line in enumerate(lines, 1):
        if pattern.match(line):
            return number
    return "?"


def resumed_options(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """Return the options of the run in --out (its run_config.json) with those that `argv` sets on top.

    Rejects an option in `argv` that changes the results and differs from the run's.
    """
    path = Path(args.out) / "run_config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        p.error(f"--resume: {path} not found, so --out {args.out} contains no run to resume; "
                "start the run without --resume")
    except (OSError, ValueError) as e:
        p.error(f"--resume: cannot read {path} ({e}); start a new run in another --out")
    if not isinstance(saved, dict):
        p.error(f"--resume: {path} is not a JSON object; start a new run in another --out")
    explicit = explicit_options(p, argv)
    differences = option_differences(saved, explicit)
    if differences:
        p.error(f"--resume: {'; '.join(differences)}. These options change the results, so leave them out to "
                "continue the run with its own values, or start a new run in another --out")
    current = vars(args)
    return argparse.Namespace(**{**current, **{k: v for k, v in saved.items() if k in current}, **explicit})


def explicit_options(p: argparse.ArgumentParser, argv: list[str]) -> dict:
    """Return the options that `argv` sets, leaving out those that take their default."""
    defaults = {action: action.default for action in p._actions}
    for action in p._actions:
        action.default = argparse.SUPPRESS
    try:
        return vars(p.parse_args(argv))
    finally:
        for action, default in defaults.items():
            action.default = default


def option_differences(run: dict, now: dict) -> list[str]:
    """Describe each option outside RESUME_MAY_CHANGE whose value in `now` differs from `run`."""
    return [f"--{key.replace('_', '-')} is {now[key]!r} but the run used {run[key]!r}"
            for key in sorted(run.keys() & now.keys()) if key not in RESUME_MAY_CHANGE and run[key] != now[key]]


# Options that act only on the post-completion part, which a run with --no-post-completion lacks.
POST_COMPLETION_OPTIONS = ("lambda_eval", "lambda_score", "eval_track_batch_size", "pool_size", "balance_eval_track",
                           "cold_start_examples", "sample_every", "eval_track_samples", "eval_track_temperature",
                           "eval_track_from_rollouts", "w_con", "graded_consistency", "split_advantage",
                           "max_evaluation_tokens")


def warn_no_post_completion(explicit: dict):
    """Log the options given that act only on the post-completion part, which a run without it ignores.

    They are not rejected, so that one set of options (a --config file, the flags that eval.tables
    passes to every method) can serve the baselines and PCL alike. Under torchrun only rank 0 logs.
    """
    given = [f"--{name.replace('_', '-')}" for name in POST_COMPLETION_OPTIONS if name in explicit]
    if given and os.environ.get("RANK", "0") == "0":
        log.warning("--no-post-completion: ignoring %s, which act only on the post-completion part", ", ".join(given))


def check_args(p: argparse.ArgumentParser, args):
    at_least = {"steps": 1, "batch_size": 1, "eval_track_batch_size": 0, "pool_size": 1, "cold_start_examples": 0,
                "sample_every": 0, "eval_track_samples": 1, "prompts_per_step": 1, "max_new_tokens": 1,
                "max_evaluation_tokens": 1, "eval_examples": 0, "eval_batch_size": 1, "log_every": 1,
                "warmup_steps": 0, "lr_warmup": 1, "train_examples": 1, "vocab_size": 300, "inner_steps": 1,
                "micro_batch_size": 0, "save_every": 0, "keep": 1, "max_bad_steps": 1}
    for action in p._actions:
        value = getattr(args, action.dest, None)
        if action.type is float and value is not None and not math.isfinite(value):
            p.error(f"{action.option_strings[0]} must be a finite number, got {value}")
    for name, low in at_least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {value}")

    for name in ("lr", "warmup_lr", "clip_low", "clip_high"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("kl_coef", "temperature", "w_acc", "w_fmt", "w_con", "lambda_eval", "lambda_score", "lambda_sft",
                 "eval_track_temperature", "weight_decay", "grad_clip"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")

    if args.clip_low >= 1:
        p.error(f"--clip-low must be below 1 (the ratio's lower bound is 1 - clip_low), got {args.clip_low}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.w_acc + args.w_fmt == 0:
        p.error("--w-acc and --w-fmt are both 0, so every answer gets the same reward")

    try:
        device = torch.device("cuda" if args.device == "auto" else args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: invalid device; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and args.device != "auto" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine; use --device cpu")

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out}: exists and is not a directory")
    if (out / "tokenizer").exists() and not (out / "tokenizer").is_dir():
        p.error(f"--out {out}: {out / 'tokenizer'} is not a directory; remove it, or pass another --out")
    if args.phase in ("rl", "hybrid") and args.group_size < 2:
        p.error(f"--group-size must be at least 2 for GRPO (advantages compare samples of a group), got {args.group_size}")
    if args.phase in ("rl", "hybrid") and args.temperature == 0 and os.environ.get("RANK", "0") == "0":
        log.warning("--temperature 0 samples greedily, so the %d samples of a group are the same completion, every "
                    "GRPO advantage is 0 and the policy-gradient term gives no gradient", args.group_size)
    if args.data != "synthetic" and not args.data_dir:
        p.error(f"--data {args.data} reads local files: pass --data-dir")


# ---------------------------------------------------------------------------------------------
# set-up


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def tokenizer_texts(task: str, rows: list[Row], weights: rewards.RewardWeights) -> list[str]:
    """Texts a from-scratch tokenizer learns from: prompts, gold completions, evaluation texts."""
    texts = []
    for row in rows:
        texts += [format_prompt(task, row), row.reasoning, row.answer]
    for acc in (0, 1):
        for fmt in (0, 1):
            texts += rewards.render_evaluation(acc, fmt, weights)
    return texts


def build_model(args, train_rows, weights, out: Path) -> tuple[Tokenizer, Transformer]:
    if args.init:
        return load_model_and_tokenizer(args.init, dtype=torch.float32)
    tok = scratch_tokenizer(args, train_rows, weights, out)
    return tok, scratch_model(args, tok)


def scratch_tokenizer(args, train_rows, weights, out: Path) -> Tokenizer:
    """Return a tokenizer trained on this task at first use and cached in the run directory."""
    cached = out / "tokenizer"
    trained_on = {"data": args.data, "data_dir": args.data_dir, "vocab_size": args.vocab_size,
                  "train_examples": args.train_examples, "seed": args.seed}
    stamp = cached / "trained_on.json"
    problem = cached_tokenizer_problem(cached, stamp, trained_on)
    if problem is None:
        try:
            tok = Tokenizer.from_folder(cached)
            log.info("tokenizer: %s (cached, %d ids)", cached, tok.vocab_size)
            return tok
        except (OSError, ValueError) as e:
            problem = f"cannot be read ({e})"
    if problem != "missing":
        log.warning("tokenizer: the cached one in %s %s; training a new one", cached, problem)
    tok = train_tokenizer(tokenizer_texts(args.data, train_rows[:5000], weights), args.vocab_size)
    stamp.unlink(missing_ok=True)  # a save cut short must not be taken for a finished one
    tok.save(cached)
    write_json(stamp, trained_on)
    log.info("tokenizer: trained on %s, %d ids, saved to %s", args.data, tok.vocab_size, cached)
    return tok


def cached_tokenizer_problem(cached: Path, stamp: Path, trained_on: dict) -> str | None:
    """Return why the tokenizer cached in `cached` cannot be used for these options ("missing" when
    nothing is there), or None when it can."""
    files = [cached / "tokenizer.json", cached / "tokenizer_config.json", stamp]
    if not any(f.exists() for f in files):
        return "missing"
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        return f"lacks {', '.join(absent)}"
    try:
        stamped = json.loads(stamp.read_text())
    except (OSError, ValueError) as e:
        return f"has an unreadable {stamp.name} ({e})"
    return None if stamped == trained_on else "was trained for other options"


def scratch_model(args, tok: Tokenizer) -> Transformer:
    """Return a model of --preset with random weights drawn from --seed, the same in every process."""
    config = ModelConfig.from_preset(args.preset, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.pad_id)
    model = Transformer(config)
    model.init_weights(seed=args.seed)
    log.info("model: preset %s, %.2fM parameters", args.preset, sum(p.numel() for p in model.parameters()) / 1e6)
    return model


class RowSampler:
    """Training rows in a seeded random order, reshuffled each epoch."""

    def __init__(self, rows: list[Row], seed: int):
        self.rows, self.seed = rows, seed
        self.epoch, self.position = 0, 0
        self.order = self._shuffled()

    def _shuffled(self):
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict):
        self.epoch = state["epoch"]
        self.order = self._shuffled()
        self.position = state["position"]

    def next(self, n: int) -> list[Row]:
        batch = []
        while len(batch) < n:
            if self.position == len(self.order):
                self.epoch, self.position = self.epoch + 1, 0
                self.order = self._shuffled()
            batch.append(self.rows[self.order[self.position]])
            self.position += 1
        return batch


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def rows_sha256(*splits: list[Row]) -> str:
    """Return a SHA-256 of the rows' text, which a resume compares to detect a changed dataset."""
    digest = hashlib.sha256()
    for rows in splits:
        for row in rows:
            digest.update(json.dumps([row.question, row.answer, row.reasoning, row.options]).encode() + b"\n")
        digest.update(b"\0")  # end of a split
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class Stage:
    phase: str  # "sft", "rl" or "hybrid"
    steps: int
    peak_lr: float
    warmup: bool = False  # the SFT warm-up before rl or hybrid, evaluated when it ends


def plan_stages(args) -> list[Stage]:
    """Return the run's stages: rl and hybrid start with --warmup-steps SFT steps, if any."""
    stages = []
    if args.phase in ("rl", "hybrid") and args.warmup_steps > 0:
        stages.append(Stage("sft", args.warmup_steps, args.warmup_lr, warmup=True))
    stages.append(Stage(args.phase, args.steps, args.lr))
    return stages


class TrainingError(Exception):
    """An error that ends the run; the message gives the reason and the fix."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run at a step boundary, after a checkpoint."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """Turn the first SIGINT or SIGTERM into a stop request that the training loop reads after each
    step. A second signal stops the process at once."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        log.warning("received %s: stopping after the current step and a checkpoint (send it again to stop at once)",
                    signal.Signals(signum).name)


class Trainer:
    """The training loop of one run: its stages, steps, metrics lines and checkpoints.

    The position in the run is (stage_index, stage_step): the stage and the steps done in it.
    restore() sets it, and every other piece of state, from a checkpoint.
    """

    def __init__(self, args, tok, model, score_head, train_rows, test_rows, weights, ctx: Dist, out: Path,
                 checkpoints: CheckpointStore):
        self.args, self.tok, self.model, self.out = args, tok, model, out
        self.ctx, self.device = ctx, ctx.device
        device = ctx.device
        self.train_rows, self.test_rows, self.weights = train_rows, test_rows, weights
        self.rng = random.Random(args.seed)
        # NOTE: sampling draws come from row keys (model.generate.row_key), not from this generator.
        # It stays in the checkpoints' RNG states so that their format does not change.
        self.generator = torch.Generator(device=device).manual_seed(args.seed)
        # The forward passes that train go through train_model; generation, the reference copy and
        # saving use the plain module. DistributedDataParallel and FSDP2 both average the gradients
        # over the processes, but each process's loss is its part of a sum divided by the normaliser
        # of the whole step (see grpo_backward and sft_backward). So the losses are multiplied by the
        # world size: the average of world_size * (part of the sum) is the single-process gradient.
        model.compile_layers = args.compile_layers
        self.train_model, self.grad_scale = model, float(ctx.world_size)
        if ctx.enabled and not distributed.is_sharded(model):
            self.train_model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
        self.sampler = RowSampler(train_rows, args.seed)
        self.sft_cfg = SFTConfig(args.batch_size, args.eval_track_batch_size, args.lambda_eval,
                                 args.lambda_score, args.pool_size, args.balance_eval_track)
        self.grpo_cfg = GRPOConfig(
            group_size=args.group_size, prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, clip_low=args.clip_low, clip_high=args.clip_high,
            kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, kl_on_flat_groups=args.kl_on_flat_groups,
            inner_steps=args.inner_steps, micro_batch_size=args.micro_batch_size, scale_rewards=args.scale_rewards,
            loss_agg=args.loss_agg, mask_truncated=args.mask_truncated, split_advantage=args.split_advantage,
            compile_decode=args.compile_decode)
        self.score_head = score_head
        self.reward_fns = white_box_reward_fns(args.data, weights, consistency=args.post_completion)
        # without post-completion the evaluation track stays empty, so SFT is the reasoning track alone
        self.eval_track = EvaluationTrack(tok, args.data, weights, args.pool_size, args.balance_eval_track)
        if args.post_completion:
            self.eval_track.cold_start(train_rows[:args.cold_start_examples], self.rng)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                         else nullcontext())
        self.checkpoints = checkpoints
        self.data_sha256 = rows_sha256(train_rows, test_rows)
        self.step = 0  # optimizer steps over all stages
        self.stage_index, self.stage_step = 0, 0
        self.optimizer = None  # a fresh AdamW per stage
        self.ref_model, self.reference_step = None, None  # reference_step: when ref_model was copied
        self.summary = {}  # metrics to report in summary.json, such as after_sft_warmup
        self.skipped_updates = 0  # optimizer updates skipped for a non-finite loss or gradient norm
        self.bad_in_a_row = 0  # of them, those since the last good update
        self.saved_folder = None  # the newest checkpoint
        self.metrics_file = None  # metrics.jsonl, open for appending while run() runs

    # one step of each kind -------------------------------------------------------------------

    def sft_batch(self):
        """Draw the step's SFT batch and return this process's part of each track. Every process
        draws the whole batch, so the data order and self.rng stay the same on all of them."""
        rows = self.sampler.next(self.sft_cfg.batch_size)
        rows = [rows[i] for i in self.ctx.shard(len(rows))]
        reasoning = [reasoning_track(self.tok, prompt_ids(self.tok, format_prompt(self.args.data, r)), gold_completion(r),
                                     self.args.post_completion) for r in rows]
        evaluation = self.eval_track.sample(self.sft_cfg.eval_batch_size if self.args.post_completion else 0, self.rng)
        evaluation = [evaluation[i] for i in self.ctx.shard(len(evaluation))]
        return reasoning, evaluation

    def sft_backward(self, scale: float = 1.0) -> dict:
        reasoning, evaluation = self.sft_batch()
        stats = sft_backward(self.train_model, reasoning, evaluation, self.score_head, self.sft_cfg, self.tok.pad_id,
                             self.args.micro_batch_size, scale * self.grad_scale, compile=self.args.compile,
                             autocast=self.autocast, reduce=self.ctx.sum)
        stats["tokens"] = sum(len(s) for s in reasoning) + sum(len(e.sequence) for e in evaluation)
        return stats

    def refresh_evaluation_track(self):
        """Answer training prompts with the current model, stopping at the marker as inference does,
        and add the graded answers to the evaluation track. Each process answers its part of the
        prompts, and every process adds all answers, in the order of one process."""
        rows = self.sampler.next(self.args.eval_track_samples)
        prompts = [prompt_ids(self.tok, format_prompt(self.args.data, r)) for r in rows]
        part = self.ctx.shard(len(rows))
        completions = []
        with distributed.full_weights(self.model):
            if part:
                self.model.eval()
                with torch.no_grad(), self.autocast:
                    out = generate(self.model, [prompts[i] for i in part], self.args.max_new_tokens,
                                   stop_ids=[self.tok.marker_id, self.tok.eos_id], pad_id=self.tok.pad_id,
                                   temperature=self.args.eval_track_temperature,
                                   row_keys=[row_key(self.args.seed, "evaluation track", self.step, i) for i in part],
                                   compile=self.args.compile_decode)
                self.model.train()
                completions = out.tokens
        completions = self.ctx.gather(completions)
        for row, prompt, ids in zip(rows, prompts, completions):
            self.add_sample(row, prompt, ids)

    def add_sample(self, row, prompt, completion):
        """Put the part of a sample before the marker into the evaluation track."""
        if self.tok.marker_id in completion:
            completion = completion[:completion.index(self.tok.marker_id)]
        elif completion and completion[-1] == self.tok.eos_id:
            completion = completion[:-1]
        self.eval_track.add(row, prompt, completion)

    def update(self, backward) -> dict:
        """One optimizer update: zero the gradients, run `backward` (which accumulates them and returns
        statistics), clip and step. An update whose loss or gradient norm is not finite is skipped,
        so it changes neither the weights nor the optimizer state."""
        self.optimizer.zero_grad(set_to_none=True)
        stats = backward()
        # the gradients are the same on every process here, so the norm and the decision to skip are too
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        grad_norm = grad_norm.item()
        losses = {key: stats[key] for key in ("sft_loss", "grpo_loss") if key in stats}
        if math.isfinite(grad_norm) and all(math.isfinite(v) for v in losses.values()):
            self.optimizer.step()
            self.bad_in_a_row = 0
            return {**stats, "grad_norm": grad_norm, "skipped_updates": 0}

        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_updates += 1
        self.bad_in_a_row += 1
        values = ", ".join(f"{key} {value}" for key, value in {**losses, "gradient norm": grad_norm}.items())
        log.warning("step %d: non-finite loss or gradient norm (%s), optimizer update skipped; %d in a row, %d in "
                    "this run (the run stops at --max-bad-steps %d in a row)", self.step + 1, values,
                    self.bad_in_a_row, self.skipped_updates, self.args.max_bad_steps)
        return {**stats, "grad_norm": grad_norm, "skipped_updates": 1}

    def rl_step(self, with_sft: bool) -> dict:
        """Sample a batch of rollouts, then run cfg.inner_steps optimizer updates on it (each with a
        fresh SFT batch in hybrid). Returns the rollout statistics and the updates' mean statistics."""
        cfg = self.grpo_cfg
        G = cfg.group_size
        rows = self.sampler.next(cfg.prompts_per_step)
        # this process's prompts, each with its whole group, so advantages need no communication.
        # The keys make each sample's draws independent of which process samples it.
        part = self.ctx.shard(len(rows))
        keys = [row_key(self.args.seed, "rollout", self.step, i, j) for i in part for j in range(G)]
        with self.autocast, distributed.full_weights(self.model):
            rollouts = collect_rollouts(self.model, self.tok, self.args.data, [rows[i] for i in part], cfg,
                                        self.weights, self.generator, reward_fns=self.reward_fns, row_keys=keys)
        if with_sft and self.args.eval_track_from_rollouts and self.args.post_completion:
            # every process adds the rollouts of all, in the order of one process
            owners = [i for i in part for _ in range(G)]  # (B,) the prompt index of each local sample
            prompts = [prompt_ids(self.tok, format_prompt(self.args.data, row)) for row in rows]
            for i, completion in self.ctx.gather(list(zip(owners, rollouts.completions))):
                self.add_sample(rows[i], prompts[i], completion)
        batches = micro_batches(rollouts, cfg, self.device)
        rollout_tokens = sum(len(s) for s in rollouts.sequences)

        def backward():
            stats = grpo_backward(self.train_model, self.ref_model, batches, cfg, scale=self.grad_scale,
                                  autocast=self.autocast, reduce=self.ctx.sum)
            stats["tokens"] = rollout_tokens
            if with_sft:
                sft = self.sft_backward(scale=self.args.lambda_sft)
                stats["tokens"] += sft.pop("tokens")
                stats.update(sft)
            return stats

        updates = [self.update(backward) for _ in range(cfg.inner_steps)]
        stats = {key: sum(u[key] for u in updates) / len(updates) for key in updates[0]}
        # only the first update compares the sampler's log-probs with the training forward's
        stats["grpo_sampler_logprob_error"] = updates[0]["grpo_sampler_logprob_error"]
        stats["tokens"] = sum(u["tokens"] for u in updates)
        stats["skipped_updates"] = sum(u["skipped_updates"] for u in updates)
        stats.update(rollout_stats(self.gather_rollouts(rollouts), cfg.group_size, cfg.mask_truncated))
        return stats

    def gather_rollouts(self, rollouts):
        """Return the rollouts of every process with the fields that rollout_stats reads, in the
        order of one process. In a single process, return `rollouts` itself."""
        if not self.ctx.enabled:
            return rollouts
        names = list(rollouts.rewards)
        local = [(rollouts.completions[b], rollouts.stopped[b], rollouts.predicted[b], rollouts.total[b].item(),
                  bool(rollouts.flat[b]), [rollouts.rewards[name][b].item() for name in names])
                 for b in range(len(rollouts.completions))]
        completions, stopped, predicted, total, flat, values = zip(*self.ctx.gather(local))
        return SimpleNamespace(completions=list(completions), stopped=list(stopped), predicted=list(predicted),
                               total=torch.tensor(total), flat=torch.tensor(flat),
                               rewards={name: torch.tensor([v[k] for v in values]) for k, name in enumerate(names)})

    # stages -------------------------------------------------------------------------------------

    def run(self, stages: list[Stage], stop: StopSignals):
        """Run the stages from the current position to the end, evaluating after the SFT warm-up.

        Raises Interrupted after a stop request and TrainingError after --max-bad-steps non-finite
        updates in a row.
        """
        first = self.stage_index
        metrics_file = open(self.out / "metrics.jsonl", "a") if self.ctx.is_main else nullcontext()
        with metrics_file as self.metrics_file:
            for index in range(first, len(stages)):
                stage = stages[index]
                if index != first or self.stage_step == 0:  # else a checkpoint resumed this stage
                    signum = self.stop_signal(stop)
                    if index != first and signum is not None:
                        raise Interrupted(signum)  # the previous stage's last checkpoint is saved
                    self.start_stage(index, stage)
                self.run_steps(stage, last=index == len(stages) - 1, stop=stop)
                self.optimizer = self.ref_model = None
                if stage.warmup:
                    metrics, _ = self.evaluate()
                    self.summary["after_sft_warmup"] = metrics
                    log.info("after SFT warm-up: %s", json.dumps(metrics))

    def stop_signal(self, stop: StopSignals) -> int | None:
        """Return the signal that asked the run to stop, on every process when any of them got one
        (torchrun passes a signal to each worker, but not at the same moment), else None."""
        if not self.ctx.enabled:
            return stop.signum
        return int(self.ctx.max([stop.signum or 0])[0]) or None

    def start_stage(self, index: int, stage: Stage):
        if stage.warmup:
            log.info("no --init: running %d dual-track SFT steps before %s, so the policy writes the format",
                     stage.steps, self.args.phase)
        self.stage_index, self.stage_step = index, 0
        self.optimizer = self.new_optimizer(stage)
        if stage.phase in ("rl", "hybrid") and self.args.kl_coef > 0:
            self.ref_model = self.frozen_copy()
            self.reference_step = self.step

    def frozen_copy(self) -> Transformer:
        """Return a copy of the model that does not train, sharded like it under FSDP2."""
        if not distributed.is_sharded(self.model):
            return copy.deepcopy(self.model).eval().requires_grad_(False)
        # built on the meta device and sharded the same way, so that each process copies only its
        # own shards and never holds the whole model
        with torch.device("meta"):
            copied = Transformer(self.model.config)
        distributed.shard_model(copied, self.args.dtype)
        copied.to_empty(device=self.device)
        copied.compile_layers = self.model.compile_layers
        with torch.no_grad():
            for target, source in zip(copied.parameters(), self.model.parameters()):
                target.to_local().copy_(source.to_local())
            for target, source in zip(copied.buffers(), self.model.buffers()):
                target.copy_(source)
        return copied.eval().requires_grad_(False)

    def new_optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=stage.peak_lr, weight_decay=self.args.weight_decay,
                                 betas=(0.9, 0.95))

    def run_steps(self, stage: Stage, last: bool, stop: StopSignals):
        """Run the stage's remaining steps, each followed by its metrics line and, when due, a checkpoint."""
        args = self.args
        self.model.train()
        bar = tqdm(range(self.stage_step, stage.steps), desc=stage.phase, dynamic_ncols=True,
                   disable=None if self.ctx.is_main else True,
                   initial=self.stage_step, total=stage.steps)
        for stage_step in bar:
            record = self.train_step(stage, stage_step)
            self.stage_step, self.step = stage_step + 1, self.step + 1
            record = {"step": self.step, **record}
            if self.metrics_file is not None:
                self.metrics_file.write(json.dumps(record) + "\n")
                self.metrics_file.flush()
            if stage_step % args.log_every == 0 or stage_step == stage.steps - 1:
                log.info(format_log_line(record, stage_step, stage.steps))
            bar.set_postfix(loss=f"{record['loss']:.3f}")

            if self.bad_in_a_row >= args.max_bad_steps:
                raise TrainingError(self.bad_updates_message())
            stage_done = self.stage_step == stage.steps
            # a checkpoint right after a skipped update is left out, so that a run that goes on to
            # fail keeps the checkpoints from before its non-finite updates
            due = args.save_every and self.step % args.save_every == 0 and self.bad_in_a_row == 0
            signum = self.stop_signal(stop)
            if due or stage_done or signum is not None:
                self.save_checkpoint(stage, finished=stage_done and last)
            if signum is not None:
                raise Interrupted(signum)

    def train_step(self, stage: Stage, stage_step: int) -> dict:
        """One optimizer step of `stage` (with --inner-steps, one batch of rollouts); returns its metrics."""
        args = self.args
        t0 = time.perf_counter()
        lr = learning_rate(stage_step, stage.steps, stage.peak_lr, args.lr_warmup)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        refresh = args.sample_every and stage_step % args.sample_every == args.sample_every - 1
        if stage.phase in ("sft", "hybrid") and refresh and args.post_completion:
            self.refresh_evaluation_track()
        if stage.phase == "sft":
            stats = self.update(self.sft_backward)
            stats["loss"] = stats["sft_loss"]
        else:
            stats = self.rl_step(with_sft=stage.phase == "hybrid")
            stats["loss"] = stats["grpo_loss"] + (args.lambda_sft * stats["sft_loss"] if stage.phase == "hybrid" else 0)
        dt = time.perf_counter() - t0
        stats["tokens"] = int(self.ctx.sum([stats["tokens"]])[0])  # trained on in this step, all processes
        stats["tokens_per_s"] = stats["tokens"] / dt
        return {"phase": stage.phase, "lr": lr, "dt": dt, **stats}

    def bad_updates_message(self) -> str:
        message = (f"{self.bad_in_a_row} optimizer updates in a row had a non-finite loss or gradient norm, the last "
                   f"in step {self.step}, so the run stopped without saving. ")
        if self.saved_folder is None:
            return message + "No checkpoint was written yet: start a new run with a lower --lr or --warmup-lr"
        return message + (f"The newest checkpoint, {self.saved_folder}, is intact: resume from it with --resume "
                          "and a larger --max-bad-steps to skip these updates, or start a new run with a lower "
                          "--lr or --warmup-lr")

    # checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self, stage: Stage, finished: bool):
        """Write everything that the steps after this one depend on (see train_state.py).

        Rank 0 writes it alone, in the single-process format. Every process has the same RNG
        states, data position and evaluation track, and under DistributedDataParallel also the same
        weights and optimizer state. Under FSDP2 rank 0 gathers those from the shards first. So one
        copy restores a run with any number of processes, with or without FSDP2.
        """
        t0 = time.perf_counter()
        training = self.stage_step < stage.steps  # the optimizer and the reference are needed only within a stage
        # under FSDP2 these gather the shards on rank 0, which every process takes part in
        model = plain_model(self.model)
        reference = plain_model(self.ref_model) if training and self.ref_model is not None else None
        optimizer = None
        if training:
            sharded = distributed.is_sharded(self.model)
            optimizer = distributed.full_optimizer_state(self.model, self.optimizer) if sharded else self.optimizer
        if not self.ctx.is_main:
            self.saved_folder = self.checkpoints.root / f"step-{self.step:06d}"
            return
        tensors, rng_values = rng_state(self.generator, self.rng)
        state = {
            "format": STATE_FORMAT,
            "step": self.step,
            "stage": self.stage_index,
            "stage_step": self.stage_step,
            "finished": finished,  # every step of the run is done
            "schedule": {"phase": stage.phase, "steps": stage.steps, "peak_lr": stage.peak_lr,
                         "lr_warmup": self.args.lr_warmup},
            "rng": rng_values,
            "sampler": self.sampler.state_dict(),
            "evaluation_track": self.eval_track.state_dict(),
            "summary": self.summary,
            "skipped_updates": self.skipped_updates,
            "bad_in_a_row": self.bad_in_a_row,
            "reference_step": self.reference_step,
            "options": vars(self.args),
            "device_type": self.device.type,
            "world_size": self.ctx.world_size,
            "data_sha256": self.data_sha256,
        }
        if training:
            optimizer_tensors, state["optimizer"] = optimizer_state(optimizer)
            tensors.update(optimizer_tensors)
        self.saved_folder = self.checkpoints.save(self.step, model, self.tok, state, tensors, reference,
                                                  self.reference_step)
        log.info("checkpoint: %s (%.2fs)", self.saved_folder, time.perf_counter() - t0)

    def restore(self, checkpoint: Checkpoint, stages: list[Stage]):
        """Continue from `checkpoint`: its position, optimizer, reference model, data position,
        evaluation track, summary so far and RNG states. The model weights were loaded with it."""
        state = checkpoint.state
        self.step, self.stage_index, self.stage_step = state["step"], state["stage"], state["stage_step"]
        self.summary = state["summary"]
        self.skipped_updates, self.bad_in_a_row = state["skipped_updates"], state["bad_in_a_row"]
        self.sampler.load_state_dict(state["sampler"])
        self.eval_track.load_state_dict(state["evaluation_track"])
        self.reference_step = state["reference_step"]
        stage = stages[self.stage_index] if self.stage_index < len(stages) else None
        schedule = state["schedule"]
        if stage is None or (schedule["phase"], schedule["steps"]) != (stage.phase, stage.steps):
            planned = f"{stage.phase} for {stage.steps} steps" if stage else "no such stage"
            raise CheckpointError(
                f"{checkpoint.folder / 'trainer_state.json'}: stage {self.stage_index} of the run was {schedule['phase']} "
                f"for {schedule['steps']} steps, but the options now plan {planned}; resume with the code that "
                "started the run, or start a new run in another --out")
        if self.stage_step < stage.steps:
            self.optimizer = self.new_optimizer(stage)
            if distributed.is_sharded(self.model):
                saved = optimizer_state_dict(checkpoint.tensors, state["optimizer"])
                distributed.load_full_optimizer_state(self.model, self.optimizer, saved)
            else:
                load_optimizer_state(self.optimizer, checkpoint.tensors, state["optimizer"])
            if stage.phase in ("rl", "hybrid") and self.args.kl_coef > 0:
                if checkpoint.reference is None:
                    raise CheckpointError(f"{checkpoint.folder / 'manifest.json'}: names no reference model, which "
                                          f"the {stage.phase} stage needs for its KL penalty")
                self.ref_model = checkpoint.reference.to(self.device)
                if distributed.is_sharded(self.model):
                    self.ref_model = distributed.shard_model(self.ref_model, self.args.dtype)
                self.ref_model.compile_layers = self.model.compile_layers  # as frozen_copy sets it
        set_rng_state(checkpoint.tensors, state["rng"], self.generator, self.rng)
        self.saved_folder = checkpoint.folder

    def evaluate(self) -> tuple[dict, list[dict]]:
        """Answer and grade the held-out rows; returns (metrics, one record per row) on every
        process. Each process answers its contiguous part of the rows."""
        rows = [self.test_rows[i] for i in self.ctx.shard(len(self.test_rows))]
        records = []
        with distributed.full_weights(self.model):
            if rows:
                with self.autocast:
                    records = answer_and_grade(self.model, self.tok, self.args.data, rows, self.weights,
                                               self.args.eval_batch_size, self.args.max_new_tokens,
                                               self.args.max_evaluation_tokens, self.args.post_completion)
        records = self.ctx.gather(records)
        return summarize(records, self.args.post_completion), records


def format_log_line(record: dict, stage_step: int, steps: int) -> str:
    line = f"{record['phase']:6s} step {stage_step + 1:05d}/{steps:05d} | loss {record['loss']:.4f}"
    for key, label in [("sft_reason", "reason"), ("sft_eval", "eval"), ("sft_score", "score"),
                       ("reward", "reward"), ("reward_accuracy", "acc"), ("reward_consistency", "con"),
                       ("reward_unparseable", "unparsed"), ("groups_all_equal", "flat"), ("grpo_kl", "kl"),
                       ("grpo_clip_low", "clip_lo"), ("grpo_clip_high", "clip_hi"), ("grpo_entropy", "entropy"),
                       ("completion_length", "len"), ("truncated", "trunc"), ("grad_norm", "gnorm")]:
        if key in record:
            line += f" | {label} {record[key]:.3f}"
    return line + f" | lr {record['lr']:.1e} | {record['tokens_per_s']:.0f} tok/s | dt {record['dt']:.2f}s"


def load_data(args) -> tuple[list[Row], list[Row], int | None]:
    """Load the training and held-out rows; returns them and, with --skip-bad-rows, the number of
    invalid rows skipped. Exits with the loader's message on invalid data."""
    invalid = set()  # messages, since strategyqa reports an invalid record once per split

    def skip(error: DataError):
        if str(error) not in invalid:
            invalid.add(str(error))
            if len(invalid) <= 10:
                log.warning("--skip-bad-rows: skipping %s", error)

    on_bad_row = skip if args.skip_bad_rows else None
    try:
        train_rows = load_rows(args.data, "train", args.data_dir, limit=args.train_examples, seed=args.seed,
                               on_bad_row=on_bad_row)
        test_rows = load_rows(args.data, "test", args.data_dir, limit=args.eval_examples or None, seed=args.seed,
                              on_bad_row=on_bad_row)
    except RowError as e:
        sys.exit(f"error: {e}, or pass --skip-bad-rows to skip invalid rows")
    except DataError as e:
        sys.exit(f"error: {e}")
    if not args.skip_bad_rows:
        return train_rows, test_rows, None
    listed = " (the first 10 are listed above)" if len(invalid) > 10 else ""
    log.log(logging.WARNING if invalid else logging.INFO, "--skip-bad-rows: skipped %d invalid rows%s",
            len(invalid), listed)
    return train_rows, test_rows, len(invalid)


def open_checkpoint(args, store: CheckpointStore, device: torch.device, data_sha256: str,
                    world_size: int = 1) -> Checkpoint | None:
    """With --resume, load the newest usable checkpoint and check that it belongs to these options
    and data; None when the run stopped before its first checkpoint. Without --resume, exit rather
    than overwrite an unfinished run. Exits with a message on every problem."""
    if not args.resume:
        folders = store.step_folders()
        if folders and not store.is_finished(folders[-1]):
            sys.exit(f"error: --out {args.out} contains an unfinished run (newest checkpoint {folders[-1].name}); "
                     f"continue it with --resume, or delete {store.root} to start it over")
        return None
    try:
        checkpoint = store.load_latest()
    except CheckpointError as e:
        sys.exit(f"error: --resume: {e}")
    if checkpoint is None:
        log.warning("--resume: no checkpoint in %s, so the run stopped before its first one; starting it from step 0",
                    store.root)
        return None

    differences = option_differences(checkpoint.state["options"], vars(args))
    if differences:
        sys.exit(f"error: --resume: {'; '.join(differences)} (in {checkpoint.folder / 'trainer_state.json'}). "
                 "These options change the results: resume with the run's values, or start a new run in another --out")
    if checkpoint.state["data_sha256"] != data_sha256:
        sys.exit(f"error: --resume: the dataset rows differ from those that {checkpoint.folder} was trained on "
                 "(their SHA-256 differs); restore the dataset files of the run, or start a new run in another --out")
    if checkpoint.state["device_type"] != device.type:
        log.warning("--resume: the run trained on %s and goes on on %s, so its numbers will differ from an "
                    "uninterrupted run by rounding", checkpoint.state["device_type"], device.type)
    # every process has the whole state, so a checkpoint restores any number of them
    saved_world_size = checkpoint.state.get("world_size", 1)
    if saved_world_size != world_size:
        log.warning("--resume: the run trained with %d processes and goes on with %d; each step still trains on "
                    "the same global batch, but its numbers will differ from an uninterrupted run by rounding",
                    saved_world_size, world_size)
    return checkpoint


def keep_metrics_until(path: Path, step: int):
    """Drop the lines of metrics.jsonl after `step`, which the resumed run computes again, and a last
    line that a kill cut short."""
    if not path.is_file():
        return
    lines = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            lines.append(line + "\n")
    atomic_write(path, lambda tmp: tmp.write_text("".join(lines)))


def plain_model(model: Transformer) -> Transformer | None:
    """Return `model`, or for an FSDP2 model a plain CPU copy of its weights on rank 0 and None on
    the other ranks. Under FSDP2 every process must call it, because it gathers the shards."""
    if not distributed.is_sharded(model):
        return model
    # NOTE: rank 0 holds the whole model in CPU memory for each checkpoint, which bounds the model size
    weights = distributed.full_state_dict(model, rank0_only=True)
    if not weights:
        return None
    copied = Transformer(model.config)
    copied.load_state_dict(weights)
    return copied


def on_main(ctx: Dist, fn):
    """Run `fn` on rank 0 only and return its picklable result on every rank. When `fn` exits
    with sys.exit, every rank exits, and only rank 0 prints the message."""
    if not ctx.enabled:
        return fn()
    outcome = None
    if ctx.is_main:
        try:
            outcome = ("value", fn())
        except SystemExit as e:
            outcome = ("exit", e.code)
    kind, value = ctx.broadcast(outcome)
    if kind == "exit":
        raise SystemExit(value if ctx.is_main or not isinstance(value, str) else 1)
    return value


def check_world_size(args, ctx: Dist, stages: list[Stage]):
    """Exit unless each batch that a stage splits over the processes divides evenly among them."""
    if ctx.world_size == 1:
        return
    names = ["prompts_per_step"] if any(stage.phase in ("rl", "hybrid") for stage in stages) else []
    if any(stage.phase in ("sft", "hybrid") for stage in stages):
        names += ["batch_size", "eval_track_batch_size"]
    for name in names:
        value = getattr(args, name)
        if value % ctx.world_size:
            sys.exit(f"error: --{name.replace('_', '-')} {value} does not divide evenly among {ctx.world_size} "
                     f"processes; use a multiple of {ctx.world_size}" if ctx.is_main else 1)


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    ctx = distributed.setup(args.device)
    # A SystemExit's traceback would keep train()'s frames, and so DistributedDataParallel, alive
    # past teardown. See distributed.teardown for why DDP must be gone first. So only the exit
    # code is kept, and the exception with its frames is dropped before teardown.
    exited, code = False, None
    try:
        train(args, ctx, started)
    except SystemExit as e:
        exited, code = True, e.code
    distributed.teardown(ctx)
    if exited:
        sys.exit(code)


def train(args, ctx: Dist, started: float):
    """Run the whole training of main(); every process of a torchrun job calls it."""
    logging.basicConfig(level=logging.INFO if ctx.is_main else logging.ERROR, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    if ctx.enabled:
        log.info("distributed: %d processes, backend %s, device %s on rank 0", ctx.world_size,
                 torch.distributed.get_backend(), ctx.device)
    out = Path(args.out)
    seed_everything(args.seed)
    device = ctx.device
    stages = plan_stages(args)
    check_world_size(args, ctx, stages)
    if args.fsdp and not ctx.enabled:
        sys.exit("error: --fsdp shards the model over the processes that torchrun starts; run "
                 "torchrun --nproc_per_node N train.py --fsdp ..., or leave out --fsdp")

    # everything that can reject the input runs before the run directory's files are replaced
    weights = rewards.RewardWeights(args.w_acc, args.w_fmt, args.w_con, args.graded_consistency)
    train_rows, test_rows, skipped_rows = load_data(args)
    log.info("data: %s, %d training rows, %d held-out rows", args.data, len(train_rows), len(test_rows))
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(out / "checkpoints", args.keep)
    data_sha256 = rows_sha256(train_rows, test_rows)

    # rank 0 picks the checkpoint, since choosing may rename damaged folders; the others load it
    checkpoint = None

    def choose_checkpoint():
        nonlocal checkpoint
        checkpoint = open_checkpoint(args, store, device, data_sha256, ctx.world_size)
        return None if checkpoint is None else checkpoint.folder

    folder = on_main(ctx, choose_checkpoint)
    if folder is not None and not ctx.is_main:
        try:
            checkpoint = store.load(folder)
        except CheckpointError as e:
            sys.exit(f"error: --resume: rank {ctx.rank}: {e}")
    try:
        if checkpoint is not None:
            tok, model = checkpoint.tokenizer, checkpoint.model
        elif args.init:
            tok, model = build_model(args, train_rows, weights, out)
        else:
            # rank 0 trains the tokenizer or reads its cache, so that only it writes in --out
            tok = on_main(ctx, lambda: scratch_tokenizer(args, train_rows, weights, out))
            model = scratch_model(args, tok)
        score_head = ScoreHead(tok, weights, device) if args.lambda_score > 0 and args.post_completion else None
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    model.to(device)
    if args.fsdp:
        # NOTE: each process builds or loads the whole model before sharding it, so host and device
        # memory must hold one full float32 copy per process at start-up and at resume
        distributed.shard_model(model, args.dtype)
    trainer = Trainer(args, tok, model, score_head, train_rows, test_rows, weights, ctx, out, store)
    if checkpoint is not None:
        try:
            trainer.restore(checkpoint, stages)
        except CheckpointError as e:
            sys.exit(f"error: --resume: {e}")

    # the run directory's files change from here on, written by rank 0 only
    if checkpoint is not None:
        log.info("resumed from %s: step %d, %d of %d steps into %s", checkpoint.folder, trainer.step,
                 trainer.stage_step, stages[trainer.stage_index].steps, stages[trainer.stage_index].phase)
    if ctx.is_main:
        if checkpoint is not None:
            keep_metrics_until(out / "metrics.jsonl", checkpoint.step)
        else:
            (out / "metrics.jsonl").unlink(missing_ok=True)
            store.clear()  # a finished earlier run's checkpoints, or a killed first write
        write_json(out / "run_config.json", vars(args))
    log.info("evaluation track: %s", trainer.eval_track.stats())

    with StopSignals() as stop:
        try:
            trainer.run(stages, stop)
        except Interrupted as e:
            launcher = "torchrun ... train.py" if ctx.enabled else "python train.py"
            log.warning("stopped by %s after step %d; newest checkpoint: %s. Resume with: %s --resume --out %s",
                        e, trainer.step, trainer.saved_folder, launcher, shlex.quote(str(out)))
            sys.exit(128 + e.signum)
        except TrainingError as e:
            sys.exit(f"error: {e}" if ctx.is_main else 1)

    metrics, records = trainer.evaluate()
    model = plain_model(model)  # under FSDP2, gathers the weights on rank 0
    if not ctx.is_main:
        return
    summary = {**trainer.summary, **metrics}
    summary.update({"phase": args.phase, "data": args.data, "steps": args.steps, "post_completion": args.post_completion,
                    "evaluation_track": trainer.eval_track.stats(),
                    "skipped_updates": trainer.skipped_updates, "wall_seconds": time.time() - started})
    if ctx.enabled:
        summary["world_size"] = ctx.world_size
    if skipped_rows is not None:
        summary["skipped_rows"] = skipped_rows
    if checkpoint is not None:
        summary["resumed_from_step"] = checkpoint.step
    atomic_write(out / "eval_samples.jsonl",
                 lambda tmp: tmp.write_text("".join(json.dumps(record) + "\n" for record in records)))
    save_pretrained(model, tok, out / "model")
    write_json(out / "summary.json", summary)
    log.info("final: %s", json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    log.info("wrote %s (summary.json, metrics.jsonl, eval_samples.jsonl, model/, checkpoints/)", out)


if __name__ == "__main__":
    main()

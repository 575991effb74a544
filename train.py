"""Post-Completion Learning trainer: dual-track SFT, white-box GRPO, or both at once (hybrid).

    python train.py --phase hybrid                  # synthetic task, small model created here
    python train.py --phase sft --data gsm8k --data-dir ../shared/data/gsm8k --init MODEL_DIR

Without --init the model starts from random weights, so the rl and hybrid phases first run
--warmup-steps dual-track SFT steps: GRPO needs a policy that already writes the format.
Outputs in --out: run_config.json, metrics.jsonl (one JSON object per step), summary.json,
eval_samples.jsonl, the tokenizer, and the final model in model/ (HF layout).
"""

import argparse
import copy
import json
import logging
import math
import random
import sys
import time
import tomllib
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import DATASETS, DataError, Row, format_prompt, load_rows
from eval.evaluate import evaluate
from model.checkpoint import load_pretrained, save_pretrained, write_json
from model.config import PRESETS, ModelConfig
from model.generate import generate
from model.tokenizer import Tokenizer, train_tokenizer
from model.transformer import Transformer
from pcl import rewards
from pcl.grpo import GRPOConfig, collect_rollouts, grpo_backward, micro_batches, rollout_stats
from pcl.losses import KL_ESTIMATORS, LOSS_AGGREGATIONS
from pcl.sequence import prompt_ids, reasoning_track
from pcl.sft import EvaluationTrack, ScoreHead, SFTConfig, gold_completion, sft_backward

log = logging.getLogger("train")


# Options whose default depends on the dataset. The synthetic task's values make the default run
# finish in minutes on two CPU cores; the real datasets have much longer answers, and a model trained
# there from scratch is a smoke test, so their warm-up is short.
DATASET_DEFAULTS = {
    "synthetic": dict(warmup_steps=1500, max_new_tokens=96),
    "gsm8k": dict(warmup_steps=100, max_new_tokens=320),
    "strategyqa": dict(warmup_steps=100, max_new_tokens=256),
    "mathqa": dict(warmup_steps=100, max_new_tokens=320),
}

# ---------------------------------------------------------------------------------------------
# command line


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the None and False of options whose help explains their default."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--config", help="TOML file setting any of the options below (dashes or underscores); "
                                    "command-line flags override it")
    run = p.add_argument_group("run")
    run.add_argument("--phase", choices=["sft", "rl", "hybrid"], default="hybrid",
                     help="sft: dual-track SFT; rl: GRPO with white-box rewards; hybrid: GRPO + lambda_sft * SFT each step")
    run.add_argument("--out", default="runs/default", help="run directory for outputs")
    run.add_argument("--steps", type=int, default=10, help="optimizer steps of the requested phase")
    run.add_argument("--seed", type=int, default=0, help="seed for data order, initialisation and sampling")
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    run.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                     help="compute dtype (bfloat16 runs under autocast; weights and optimizer state stay float32)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                     help="torch.compile the fused losses: score regression and chunked cross-entropy (falls back to "
                          "eager with a warning where compilation is unavailable)")
    run.add_argument("--log-every", type=int, default=10, help="steps between log lines")

    data = p.add_argument_group("data")
    data.add_argument("--data", choices=DATASETS, default="synthetic", help="dataset")
    data.add_argument("--data-dir", help="folder with the dataset files (all datasets but synthetic)")
    data.add_argument("--train-examples", type=int, help="use only the first N training rows")
    data.add_argument("--eval-examples", type=int, default=200, help="held-out rows evaluated at the end")
    data.add_argument("--eval-batch-size", type=int, default=100, help="rows generated together at evaluation")

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
                     help="dual-track SFT steps run before rl or hybrid when there is no --init "
                          "(default: 1500 on synthetic, 100 on the other datasets)")
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
        args = p.parse_args(config_file_flags(p, args.config) + argv)
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
        with open(path, "rb") as f:
            options = tomllib.load(f)
    except OSError as e:
        p.error(f"--config {path}: cannot read the file ({e.strerror})")
    except tomllib.TOMLDecodeError as e:
        p.error(f"--config {path}: invalid TOML: {e}")
    actions = {a.dest: a for a in p._actions if a.option_strings and a.dest not in ("help", "config")}
    flags = []
    for key, value in options.items():
        action = actions.get(key.replace("-", "_"))
        if action is None:
            p.error(f"--config {path}: unknown option {key!r}; see --help for the options")
        if isinstance(value, bool):
            if value:
                flags.append(action.option_strings[0])
            elif isinstance(action, argparse.BooleanOptionalAction):
                flags.append(action.option_strings[1])  # the --no- form
        else:
            flags += [action.option_strings[0], str(value)]
    return flags


def check_args(p: argparse.ArgumentParser, args):
    at_least = {"steps": 1, "batch_size": 1, "eval_track_batch_size": 0, "pool_size": 1, "cold_start_examples": 0,
                "sample_every": 0, "eval_track_samples": 1, "prompts_per_step": 1, "max_new_tokens": 1,
                "max_evaluation_tokens": 1, "eval_examples": 1, "eval_batch_size": 1, "log_every": 1,
                "warmup_steps": 0, "lr_warmup": 1, "train_examples": 1, "vocab_size": 300, "inner_steps": 1,
                "micro_batch_size": 0}
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
    if args.phase in ("rl", "hybrid") and args.group_size < 2:
        p.error(f"--group-size must be at least 2 for GRPO (advantages compare samples of a group), got {args.group_size}")
    if args.data != "synthetic" and not args.data_dir:
        p.error(f"--data {args.data} reads local files: pass --data-dir")


# ---------------------------------------------------------------------------------------------
# set-up


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
        tok = Tokenizer.from_folder(args.init)
        model = load_pretrained(args.init, dtype=torch.float32)
        if tok.added_ids:
            known = min(tok.added_ids)  # the ids below were trained with the model
            if tok.vocab_size > model.config.vocab_size:
                log.info("resizing embeddings %d -> %d for the PCL tokens", model.config.vocab_size, tok.vocab_size)
                model.resize_token_embeddings(tok.vocab_size)
            # new tags start at the mean embedding, also where they take unused padding rows
            with torch.no_grad():
                for weight in {id(w): w for w in (model.model.embed_tokens.weight, model.lm_head.weight)}.values():
                    weight[tok.added_ids] = weight[:known].mean(0)
            log.info("added %d PCL tokens to the tokenizer of %s", len(tok.added_ids), args.init)
        return tok, model

    # from scratch: a tokenizer trained on this task at first use and cached in the run directory
    cached = out / "tokenizer"
    trained_on = {"data": args.data, "data_dir": args.data_dir, "vocab_size": args.vocab_size,
                  "train_examples": args.train_examples, "seed": args.seed}
    stamp = cached / "trained_on.json"
    if (cached / "tokenizer.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == trained_on:
        tok = Tokenizer.from_folder(cached)
        log.info("tokenizer: %s (cached, %d ids)", cached, tok.vocab_size)
    else:
        if (cached / "tokenizer.json").is_file():
            log.warning("tokenizer: the cached one in %s was trained for other options; training a new one", cached)
        tok = train_tokenizer(tokenizer_texts(args.data, train_rows[:5000], weights), args.vocab_size)
        tok.save(cached)
        write_json(stamp, trained_on)
        log.info("tokenizer: trained on %s, %d ids, saved to %s", args.data, tok.vocab_size, cached)
    config = ModelConfig.from_preset(args.preset, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.pad_id)
    model = Transformer(config)
    model.init_weights(seed=args.seed)
    log.info("model: preset %s, %.2fM parameters", args.preset, sum(p.numel() for p in model.parameters()) / 1e6)
    return tok, model


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


# ---------------------------------------------------------------------------------------------
# training


class Trainer:
    def __init__(self, args, tok, model, score_head, train_rows, test_rows, weights, device, out: Path):
        self.args, self.tok, self.model, self.device, self.out = args, tok, model, device, out
        self.train_rows, self.test_rows, self.weights = train_rows, test_rows, weights
        self.rng = random.Random(args.seed)
        self.generator = torch.Generator(device=device).manual_seed(args.seed)
        self.sampler = RowSampler(train_rows, args.seed)
        self.sft_cfg = SFTConfig(args.batch_size, args.eval_track_batch_size, args.lambda_eval,
                                 args.lambda_score, args.pool_size, args.balance_eval_track)
        self.grpo_cfg = GRPOConfig(
            group_size=args.group_size, prompts_per_step=args.prompts_per_step, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, clip_low=args.clip_low, clip_high=args.clip_high,
            kl_coef=args.kl_coef, kl_estimator=args.kl_estimator, kl_on_flat_groups=args.kl_on_flat_groups,
            inner_steps=args.inner_steps, micro_batch_size=args.micro_batch_size, scale_rewards=args.scale_rewards,
            loss_agg=args.loss_agg, mask_truncated=args.mask_truncated, split_advantage=args.split_advantage)
        self.score_head = score_head
        self.eval_track = EvaluationTrack(tok, args.data, weights, args.pool_size, args.balance_eval_track)
        self.eval_track.cold_start(train_rows[:args.cold_start_examples], self.rng)
        self.autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                         else nullcontext())
        self.ref_model = None
        self.step = 0  # optimizer steps over all stages
        self.metrics_file = open(out / "metrics.jsonl", "a")

    # one step of each kind -------------------------------------------------------------------

    def sft_batch(self):
        rows = self.sampler.next(self.sft_cfg.batch_size)
        reasoning = [reasoning_track(self.tok, prompt_ids(self.tok, format_prompt(self.args.data, r)), gold_completion(r))
                     for r in rows]
        evaluation = self.eval_track.sample(self.sft_cfg.eval_batch_size, self.rng)
        return reasoning, evaluation

    def sft_backward(self, scale: float = 1.0) -> dict:
        reasoning, evaluation = self.sft_batch()
        stats = sft_backward(self.model, reasoning, evaluation, self.score_head, self.sft_cfg, self.tok.pad_id,
                             self.args.micro_batch_size, scale, compile=self.args.compile, autocast=self.autocast)
        stats["tokens"] = sum(len(s) for s in reasoning) + sum(len(e.sequence) for e in evaluation)
        return stats

    def refresh_evaluation_track(self):
        """Answer training prompts with the current model, stopping at the marker as inference does,
        and add the graded answers to the evaluation track."""
        rows = self.sampler.next(self.args.eval_track_samples)
        prompts = [prompt_ids(self.tok, format_prompt(self.args.data, r)) for r in rows]
        self.model.eval()
        with torch.no_grad(), self.autocast:
            out = generate(self.model, prompts, self.args.max_new_tokens, stop_ids=[self.tok.marker_id, self.tok.eos_id],
                           pad_id=self.tok.pad_id, temperature=self.args.eval_track_temperature,
                           generator=self.generator)
        self.model.train()
        for row, prompt, ids in zip(rows, prompts, out.tokens):
            self.add_sample(row, prompt, ids)

    def add_sample(self, row, prompt, completion):
        """Put the part of a sample before the marker into the evaluation track."""
        if self.tok.marker_id in completion:
            completion = completion[:completion.index(self.tok.marker_id)]
        elif completion and completion[-1] == self.tok.eos_id:
            completion = completion[:-1]
        self.eval_track.add(row, prompt, completion)

    def update(self, optimizer, backward) -> dict:
        """One optimizer update: zero the gradients, run `backward` (which accumulates them and returns
        statistics), clip and step."""
        optimizer.zero_grad(set_to_none=True)
        stats = backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.grad_clip or float("inf"))
        optimizer.step()
        return {**stats, "grad_norm": grad_norm.item()}

    def rl_step(self, optimizer, with_sft: bool) -> dict:
        """Sample a batch of rollouts, then run cfg.inner_steps optimizer updates on it (each with a
        fresh SFT batch in hybrid). Returns the rollout statistics and the updates' mean statistics."""
        cfg = self.grpo_cfg
        rows = self.sampler.next(cfg.prompts_per_step)
        with self.autocast:
            rollouts = collect_rollouts(self.model, self.tok, self.args.data, rows, cfg, self.weights, self.generator)
        if with_sft and self.args.eval_track_from_rollouts:
            for row, prompt, completion in zip(rollouts.rows, rollouts.prompts, rollouts.completions):
                self.add_sample(row, prompt, completion)
        batches = micro_batches(rollouts, cfg, self.device)
        rollout_tokens = sum(len(s) for s in rollouts.sequences)

        def backward():
            stats = grpo_backward(self.model, self.ref_model, batches, cfg, autocast=self.autocast)
            stats["tokens"] = rollout_tokens
            if with_sft:
                sft = self.sft_backward(scale=self.args.lambda_sft)
                stats["tokens"] += sft.pop("tokens")
                stats.update(sft)
            return stats

        updates = [self.update(optimizer, backward) for _ in range(cfg.inner_steps)]
        stats = {key: sum(u[key] for u in updates) / len(updates) for key in updates[0]}
        # only the first update compares the sampler's log-probs with the training forward's
        stats["grpo_sampler_logprob_error"] = updates[0]["grpo_sampler_logprob_error"]
        stats["tokens"] = sum(u["tokens"] for u in updates)
        stats.update(rollout_stats(rollouts, cfg.group_size, cfg.mask_truncated))
        return stats

    # stages -------------------------------------------------------------------------------------

    def run_stage(self, phase: str, steps: int, peak_lr: float):
        args = self.args
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=peak_lr, weight_decay=args.weight_decay,
                                      betas=(0.9, 0.95))
        if phase in ("rl", "hybrid") and args.kl_coef > 0:
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.model.train()
        bar = tqdm(range(steps), desc=phase, dynamic_ncols=True, disable=None)
        for stage_step in bar:
            t0 = time.perf_counter()
            lr = learning_rate(stage_step, steps, peak_lr, args.lr_warmup)
            for group in optimizer.param_groups:
                group["lr"] = lr

            refresh = args.sample_every and stage_step % args.sample_every == args.sample_every - 1
            if phase in ("sft", "hybrid") and refresh:
                self.refresh_evaluation_track()
            if phase == "sft":
                stats = self.update(optimizer, self.sft_backward)
                stats["loss"] = stats["sft_loss"]
            else:
                stats = self.rl_step(optimizer, with_sft=phase == "hybrid")
                stats["loss"] = stats["grpo_loss"] + (args.lambda_sft * stats["sft_loss"] if phase == "hybrid" else 0)
            dt = time.perf_counter() - t0
            stats["tokens_per_s"] = stats.pop("tokens") / dt

            self.step += 1
            record = {"step": self.step, "phase": phase, "lr": lr, "dt": dt, **stats}
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()
            if stage_step % args.log_every == 0 or stage_step == steps - 1:
                log.info(format_log_line(record, stage_step, steps))
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        self.ref_model = None

    def evaluate(self):
        with self.autocast:
            return evaluate(self.model, self.tok, self.args.data, self.test_rows, self.weights,
                            self.args.eval_batch_size, self.args.max_new_tokens, self.args.max_evaluation_tokens)


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


def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    seed_everything(args.seed)
    device = select_device(args.device)

    # everything that can reject the input runs before the run directory's files are replaced
    weights = rewards.RewardWeights(args.w_acc, args.w_fmt, args.w_con, args.graded_consistency)
    try:
        train_rows = load_rows(args.data, "train", args.data_dir, limit=args.train_examples, seed=args.seed)
        test_rows = load_rows(args.data, "test", args.data_dir, limit=args.eval_examples, seed=args.seed)
    except DataError as e:
        sys.exit(f"error: {e}")
    log.info("data: %s, %d training rows, %d held-out rows", args.data, len(train_rows), len(test_rows))
    out.mkdir(parents=True, exist_ok=True)
    try:
        tok, model = build_model(args, train_rows, weights, out)
        score_head = ScoreHead(tok, weights, device) if args.lambda_score > 0 else None
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    model.to(device)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    write_json(out / "run_config.json", vars(args))
    trainer = Trainer(args, tok, model, score_head, train_rows, test_rows, weights, device, out)
    log.info("evaluation track: %s", trainer.eval_track.stats())

    summary = {}
    if args.phase in ("rl", "hybrid") and not args.init and args.warmup_steps > 0:
        log.info("no --init: running %d dual-track SFT steps before %s, so the policy writes the format",
                 args.warmup_steps, args.phase)
        trainer.run_stage("sft", args.warmup_steps, args.warmup_lr)
        metrics, _ = trainer.evaluate()
        summary["after_sft_warmup"] = metrics
        log.info("after SFT warm-up: %s", json.dumps(metrics))
    trainer.run_stage(args.phase, args.steps, args.lr)

    metrics, records = trainer.evaluate()
    summary.update(metrics)
    summary.update({"phase": args.phase, "data": args.data, "steps": args.steps, "evaluation_track": trainer.eval_track.stats(),
                    "wall_seconds": time.time() - started})
    with open(out / "eval_samples.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    save_pretrained(model, tok, out / "model")
    write_json(out / "summary.json", summary)
    log.info("final: %s", json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}))
    log.info("wrote %s (summary.json, metrics.jsonl, eval_samples.jsonl, model/)", out)


if __name__ == "__main__":
    main()

"""Time one hybrid step of the default run (GRPO plus dual-track SFT), broken down by phase.

    python bench/grpo_step.py [--init RUN/model] [--steps 3] [--no-compile]

The step is Trainer.rl_step of train.py with the default options, on the synthetic task. Without
--init the small model starts from random weights, so no rollout stops before --max-new-tokens
(96 tokens): the longest rollouts a step can have. With --init (the model/ folder of a finished
`python train.py --phase hybrid` run) the rollouts have their trained lengths.

Phases, timed by wrapping the functions that the step calls:

- rollout: model.generate inside pcl.grpo.collect_rollouts;
- reward: pcl.grpo.compute_rewards on the decoded texts;
- reference forward: the frozen reference model's forward passes;
- policy forward/backward: pcl.grpo.grpo_backward minus its reference forwards;
- SFT forward/backward: Trainer.sft_backward;
- other: the rest of the step (tokenising rollouts, micro-batches, gradient clipping, AdamW).

The first step is a warm-up (compilation happens there) and is not reported; the others are
summed. The hybrid stage of train.py also refreshes the evaluation track every --sample-every
steps, outside rl_step; that refresh is not timed here. The last line is a JSON summary with
seconds and share of each phase.
"""

import argparse
import copy
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import distributed  # noqa: E402
import pcl.grpo  # noqa: E402
import train  # noqa: E402
from data import load_rows  # noqa: E402
from pcl import rewards  # noqa: E402
from pcl.sft import ScoreHead  # noqa: E402
from train_state import CheckpointStore  # noqa: E402

PHASES = ["rollout", "reward", "reference forward", "policy forward/backward", "SFT forward/backward", "other"]


class PhaseTimer:
    """Accumulated wall time per phase, filled by the wrappers that timed() returns."""

    def __init__(self):
        self.seconds = defaultdict(float)

    def timed(self, phase: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - start
        return wrapper


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", help="model folder of a trained run (default: random weights)")
    p.add_argument("--steps", type=int, default=3, help="hybrid steps timed, after one warm-up step")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the fused losses, as train.py does by default")
    options = p.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        argv = ["--phase", "hybrid", "--out", folder, "--compile" if options.compile else "--no-compile"]
        if options.init:
            argv += ["--init", options.init]
        args = train.parse_args(argv)
        train.seed_everything(args.seed)
        ctx = distributed.setup(args.device)
        weights = rewards.RewardWeights(args.w_acc, args.w_fmt, args.w_con, args.graded_consistency)
        train_rows = load_rows(args.data, "train", args.data_dir, limit=args.train_examples, seed=args.seed)
        if args.init:
            tok, model = train.build_model(args, train_rows, weights, Path(folder))
        else:
            tok = train.scratch_tokenizer(args, train_rows, weights, Path(folder))
            model = train.scratch_model(args, tok)
        model.to(ctx.device)
        score_head = ScoreHead(tok, weights, ctx.device) if args.lambda_score > 0 else None
        store = CheckpointStore(Path(folder) / "checkpoints", args.keep)
        trainer = train.Trainer(args, tok, model, score_head, train_rows, [], weights, ctx, Path(folder), store)

        timer = PhaseTimer()
        pcl.grpo.generate = timer.timed("rollout", pcl.grpo.generate)
        pcl.grpo.compute_rewards = timer.timed("reward", pcl.grpo.compute_rewards)
        train.grpo_backward = timer.timed("policy forward/backward", train.grpo_backward)
        trainer.sft_backward = timer.timed("SFT forward/backward", trainer.sft_backward)
        trainer.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        trainer.ref_model.forward = timer.timed("reference forward", trainer.ref_model.forward)
        trainer.optimizer = trainer.new_optimizer(train.Stage("hybrid", options.steps + 1, args.lr))
        model.train()

        trainer.rl_step(with_sft=True)  # warm-up
        timer.seconds.clear()
        start = time.perf_counter()
        lengths = []
        for _ in range(options.steps):
            stats = trainer.rl_step(with_sft=True)
            lengths.append(stats["completion_length"])
        total = time.perf_counter() - start

    seconds = dict(timer.seconds)
    seconds["policy forward/backward"] -= seconds.get("reference forward", 0.0)  # timed inside grpo_backward
    seconds["other"] = total - sum(seconds.values())
    print(f"{options.steps} hybrid steps of the default run ({'trained model ' + options.init if options.init else 'random weights'}, "
          f"compile={options.compile}, mean completion length {sum(lengths) / len(lengths):.0f} tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads): {total / options.steps:.2f} s per step")
    for phase in PHASES:
        print(f"  {phase:24s} {seconds.get(phase, 0.0) / options.steps:7.3f} s  {100 * seconds.get(phase, 0.0) / total:5.1f}%")
    print(json.dumps({"bench": "grpo_step", "init": options.init, "compile": options.compile, "steps": options.steps,
                      "threads": torch.get_num_threads(), "seconds_per_step": total / options.steps,
                      "completion_length": sum(lengths) / len(lengths),
                      "phase_seconds_per_step": {phase: seconds.get(phase, 0.0) / options.steps for phase in PHASES},
                      "phase_share": {phase: seconds.get(phase, 0.0) / total for phase in PHASES}}))


if __name__ == "__main__":
    main()

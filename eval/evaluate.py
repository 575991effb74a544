"""Held-out evaluation: answer accuracy at inference cost, then self-evaluation quality.

    python -m eval.evaluate --checkpoint runs/default/model --data synthetic
    python -m eval.evaluate --checkpoint runs/a/checkpoints/step-000200 --data gsm8k \
        --data-dir ../shared/data/gsm8k --limit 500

Pass 1 generates greedily with `<post-completion>` and EOS as stop ids, exactly as a deployed model
runs, and measures accuracy, format rate and tokens per answer. Pass 2 continues the rows that
reached the marker up to EOS, which only evaluation does, and compares the predicted reward with the
true one. A model trained without post-completion (--no-post-completion) stops at EOS only and has
no pass 2. eval.metrics defines the metrics.

The predicted probability of correctness, which AUROC and calibration error measure, comes from the
model's distribution at the position of its predicted reward, right after <reward> in its greedy
continuation. There the model's probabilities of the ids of the possible reward values are
renormalised over those ids. Each value implies an accuracy part, eval.metrics.accuracy_component
given the answer's true format reward, and the probability of correctness is the expected
accuracy part. When a reward value is more than one token, or the continuation has another id at
that position, the probability is the accuracy part of the parsed predicted reward itself: 0 or 1
in the usual cases.
"""

import argparse
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from data import DATASETS, MAX_NEW_TOKENS, DataError, Row, format_prompt, load_rows
from eval.metrics import SELF_EVALUATION_METRICS, accuracy_component, summarize
from model.checkpoint import load_model_and_tokenizer, write_json
from model.generate import generate
from model.tokenizer import REWARD, Tokenizer
from pcl import rewards
from pcl.sequence import prompt_ids
from pcl.sft import ScoreHead

log = logging.getLogger("eval")


@torch.no_grad()
def evaluate(model, tok: Tokenizer, task: str, rows: list[Row], weights: rewards.RewardWeights,
             batch_size: int = 64, max_new_tokens: int = 96, max_evaluation_tokens: int = 48,
             post_completion: bool = True):
    """Returns (metrics dict, one record per row)."""
    records = answer_and_grade(model, tok, task, rows, weights, batch_size, max_new_tokens, max_evaluation_tokens,
                               post_completion)
    return summarize(records, post_completion), records


@torch.no_grad()
def answer_and_grade(model, tok: Tokenizer, task: str, rows: list[Row], weights: rewards.RewardWeights,
                     batch_size: int = 64, max_new_tokens: int = 96, max_evaluation_tokens: int = 48,
                     post_completion: bool = True) -> list[dict]:
    """Answer `rows` greedily, continue the answers past the marker, and grade them: one record per
    row. Processes of a data-parallel run each call it on their part of the rows.

    Without `post_completion`, answers stop at EOS only and are not continued, so every record's
    predicted reward and probability of correctness are None.
    """
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    score_head = None
    if post_completion:
        try:
            score_head = ScoreHead(tok, weights, device)
        except ValueError:
            score_head = None  # a reward value of several ids: use the parsed prediction instead
    stop_ids = [tok.marker_id, tok.eos_id] if post_completion else [tok.eos_id]
    records = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        prompts = [prompt_ids(tok, format_prompt(task, row)) for row in batch]
        answers = generate(model, prompts, max_new_tokens, stop_ids=stop_ids, pad_id=tok.pad_id, temperature=0.0)
        at_marker = []
        if post_completion:
            at_marker = [i for i, ids in enumerate(answers.tokens) if ids and ids[-1] == tok.marker_id]
        continuations = {}
        if at_marker:
            continued = generate(model, [prompts[i] + answers.tokens[i] for i in at_marker], max_evaluation_tokens,
                                 stop_ids=[tok.eos_id], pad_id=tok.pad_id, temperature=0.0)
            continuations = dict(zip(at_marker, continued.tokens))

        batch_records = []
        for i, row in enumerate(batch):
            answer_text = tok.decode_completion(answers.tokens[i])
            post_text = tok.decode_completion(continuations[i]) if i in continuations else None
            scores = rewards.score(task, answer_text + (post_text or ""), row.answer, weights, row.options)
            batch_records.append({
                "source": row.source,
                "reference": row.answer,
                "completion": answer_text,
                "post_completion": post_text,
                "tokens": len(answers.tokens[i]),
                "accuracy": scores.accuracy,
                "format": scores.format,
                "reward": scores.total,
                # a baseline that writes a marker anyway has its whole answer in one pass; its
                # self-evaluation does not count
                "predicted_reward": scores.predicted if post_completion else None,
                "correct_probability": None,
            })

        add_correct_probabilities(model, tok, weights, score_head, prompts, answers.tokens, continuations,
                                  batch_records)
        records += batch_records
    model.train(was_training)
    return records


def add_correct_probabilities(model, tok: Tokenizer, weights: rewards.RewardWeights, score_head: ScoreHead | None,
                              prompts: list[list[int]], answers: list[list[int]], continuations: dict[int, list[int]],
                              records: list[dict]):
    """Set the probability of a right answer in the records of the rows that predicted a reward.

    `continuations` maps a row's index to the ids generated after its marker. The probability comes
    from the model's distribution after the first <reward> id, which a reward parsed from the text
    usually has; see the module docstring for the fallback.
    """
    reward_id = tok.token_id(REWARD)
    predicted = [i for i in continuations if records[i]["predicted_reward"] is not None]
    positions = {i: continuations[i].index(reward_id) for i in predicted if reward_id in continuations[i][:-1]}
    prefixes = [prompts[i] + answers[i] + continuations[i][:k + 1] for i, k in positions.items()]
    distributions = dict(zip(positions, score_distributions(model, score_head, tok.pad_id, prefixes)))
    for i in predicted:
        record = records[i]
        distribution = distributions.get(i)
        predicted_id = continuations[i][positions[i] + 1] if i in positions else None
        if distribution is None or predicted_id not in score_head.ids.tolist():
            record["correct_probability"] = accuracy_component(record["predicted_reward"], record["format"], weights)
        else:
            record["correct_probability"] = expected_accuracy(distribution, score_head.values.tolist(),
                                                              record["format"], weights)


def expected_accuracy(probabilities: list[float], values: list[float], fmt: int,
                      weights: rewards.RewardWeights) -> float | None:
    """Return the expected accuracy sub-reward under a distribution over reward values, for an
    answer of format reward `fmt`; None when the weights make accuracy unreadable (w_acc = 0)."""
    components = [accuracy_component(v, fmt, weights) for v in values]
    if None in components:
        return None
    return min(1.0, sum(p * c for p, c in zip(probabilities, components)))


def score_distributions(model, score_head: ScoreHead | None, pad_id: int,
                        prefixes: list[list[int]]) -> list[list[float] | None]:
    """Return, per prefix, the next-id probabilities of the score head's ids, renormalised over them
    (None for every prefix without a score head)."""
    if score_head is None or not prefixes:
        return [None] * len(prefixes)
    device = model.lm_head.weight.device
    T = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), T), pad_id, dtype=torch.long, device=device)  # (B, T), left-padded
    mask = torch.zeros((len(prefixes), T), dtype=torch.long, device=device)
    for b, prefix in enumerate(prefixes):
        ids[b, T - len(prefix):] = torch.tensor(prefix, device=device)
        mask[b, T - len(prefix):] = 1
    logits = model(ids, attention_mask=mask, last_only=True)[:, -1]  # (B, V)
    probabilities = torch.softmax(logits[:, score_head.ids].float(), dim=-1)  # (B, K)
    return probabilities.tolist()


# ---------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Evaluate a model folder on the held-out split of a dataset and write the metrics as JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="Hugging Face model folder: a run's OUT/model, a checkpoint OUT/checkpoints/step-N, or "
                        "any folder with config.json, safetensors weights and tokenizer.json")
    p.add_argument("--data", required=True, choices=DATASETS, help="dataset")
    p.add_argument("--data-dir", help="folder with the dataset files (all datasets but synthetic)")
    p.add_argument("--limit", type=int, help="evaluate only the first N held-out rows (default: all of them)")
    p.add_argument("--out", help="JSON file for the metrics (default: CHECKPOINT/eval-DATA.json)")
    p.add_argument("--samples", help="also write one JSON line per held-out row to this file")
    p.add_argument("--post-completion", action=argparse.BooleanOptionalAction, default=None,
                   help="whether the model writes the post-completion part: with it, answers stop at the marker "
                        "and are continued to measure self-evaluation; without it, answers stop at EOS (default: "
                        "the training run's setting when the folder belongs to one, else yes)")
    p.add_argument("--w-acc", type=float, help="weight of the accuracy reward (default: the run's, else 1)")
    p.add_argument("--w-fmt", type=float, help="weight of the format reward (default: the run's, else 1)")
    p.add_argument("--seed", type=int,
                   help="seed of the synthetic task's questions; other datasets ignore it (default: the run's, else 0)")
    p.add_argument("--max-new-tokens", type=int,
                   help="length limit in tokens of each answer (default: the run's, else 96 on synthetic, 256 on "
                        "strategyqa, 320 on gsm8k and mathqa)")
    p.add_argument("--max-evaluation-tokens", type=int,
                   help="length limit in tokens of the post-completion part (default: the run's, else 48)")
    p.add_argument("--batch-size", type=int, default=64, help="rows generated together")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (bfloat16 runs under autocast)")
    args = p.parse_args(argv)
    for name in ("limit", "max_new_tokens", "max_evaluation_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    for name in ("w_acc", "w_fmt"):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0):
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if args.data != "synthetic" and not args.data_dir:
        p.error(f"--data {args.data} reads local files: pass --data-dir")
    return args


def run_options(folder: Path) -> tuple[dict, Path | None]:
    """Return the options of the training run that wrote `folder` and the file they came from.

    A checkpoint folder stores them in trainer_state.json and a run's final model folder, OUT/model,
    in OUT/run_config.json. Returns ({}, None) for a folder of neither kind.
    """
    candidates = [(folder / "trainer_state.json", "options")]
    if folder.name == "model":
        candidates.append((folder.parent / "run_config.json", None))
    for path, key in candidates:
        if not path.is_file():
            continue
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            log.warning("ignoring %s, which cannot be read as JSON (%s); pass the options as flags", path, e)
            continue
        options = content.get(key) if key and isinstance(content, dict) else content
        if isinstance(options, dict):
            return options, path
    return {}, None


def resolve_options(args: argparse.Namespace, options: dict) -> dict:
    """Return the evaluation settings: each flag given, else the run's option, else the default."""
    defaults = {"post_completion": True, "w_acc": 1.0, "w_fmt": 1.0, "seed": 0,
                "max_new_tokens": MAX_NEW_TOKENS[args.data], "max_evaluation_tokens": 48}
    resolved = {}
    for name, default in defaults.items():
        value = getattr(args, name)
        if value is None:
            # a run on another dataset has a length limit sized for that dataset
            same_data = options.get("data") == args.data or name != "max_new_tokens"
            value = options.get(name) if same_data and options.get(name) is not None else default
        resolved[name] = value
    return resolved


def format_metric(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"


METRIC_LABELS = {
    "eval_examples": "held-out rows",
    "accuracy": "accuracy",
    "format_rate": "format rate",
    "tokens_per_answer": "tokens per answer",
    "reward_prediction_accuracy": "reward prediction accuracy",
    "prediction_rate": "prediction rate",
    "reward_mae": "reward MAE",
    "correctness_auroc": "correctness AUROC",
    "correctness_ece": "correctness ECE",
}


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    started = time.time()
    args = parse_args(argv)
    folder = Path(args.checkpoint)
    options, source = run_options(folder)
    settings = resolve_options(args, options)
    if source is not None:
        log.info("options not given as flags come from %s", source)
    try:
        weights = rewards.RewardWeights(settings["w_acc"], settings["w_fmt"])
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            sys.exit(f"error: --device {args.device}: invalid device; use cpu, cuda, cuda:N or auto")

    try:
        rows = load_rows(args.data, "test", args.data_dir, limit=args.limit, seed=settings["seed"])
    except DataError as e:
        sys.exit(f"error: {e}")
    try:
        tok, model = load_model_and_tokenizer(folder)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    model.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    log.info("evaluating %s on %d held-out %s rows (post-completion: %s)", folder, len(rows), args.data,
             "yes" if settings["post_completion"] else "no")
    with autocast:
        metrics, records = evaluate(model, tok, args.data, rows, weights, args.batch_size, settings["max_new_tokens"],
                                    settings["max_evaluation_tokens"], settings["post_completion"])

    out = Path(args.out) if args.out else folder / f"eval-{args.data}.json"
    result = {"checkpoint": str(folder), "data": args.data, "data_dir": args.data_dir, "split": "test",
              "limit": args.limit, "settings": settings, "metrics": metrics, "wall_seconds": time.time() - started}
    try:
        write_json(out, result)
        if args.samples:
            Path(args.samples).write_text("".join(json.dumps(record) + "\n" for record in records))
    except OSError as e:
        sys.exit(f"error: cannot write the results ({e}); pass --out (and --samples) with a writable path")

    width = max(len(label) for label in METRIC_LABELS)
    for key, label in METRIC_LABELS.items():
        print(f"{label:<{width}}  {format_metric(metrics[key])}")
    if not settings["post_completion"]:
        print(f"(no post-completion: {', '.join(SELF_EVALUATION_METRICS)} do not apply)")
    log.info("wrote %s", out)


if __name__ == "__main__":
    main()

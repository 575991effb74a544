"""End-to-end: train.py runs every phase for a few steps on a tiny config and writes its outputs."""

import json
import math
from pathlib import Path

import pytest
import torch

import train
from model.checkpoint import load_pretrained

FIXTURES = Path(__file__).parent / "fixtures"
TINY = ["--preset", "tiny", "--warmup-steps", "3", "--steps", "2", "--eval-examples", "4", "--train-examples", "40",
        "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "24", "--max-evaluation-tokens", "12",
        "--batch-size", "4", "--eval-track-batch-size", "4", "--cold-start-examples", "8", "--sample-every", "2",
        "--eval-track-samples", "2",
        "--no-compile", "--log-every", "1"]
SUMMARY_KEYS = ["accuracy", "format_rate", "reward_prediction_accuracy", "tokens_per_answer", "eval_examples",
                "wall_seconds"]


# every per-step statistic a hybrid step logs in metrics.jsonl
HYBRID_METRICS = [
    "reward", "reward_std", "reward_accuracy", "reward_accuracy_std", "reward_format", "reward_format_std",
    "reward_consistency", "reward_consistency_std", "reward_unparseable", "reward_missing", "groups_all_equal",
    "completion_length", "completion_length_min", "completion_length_max", "truncated", "grpo_kl",
    "grpo_clip_low", "grpo_clip_high", "grpo_entropy", "grpo_policy_loss", "grpo_loss", "grpo_ratio",
    "grpo_sampler_logprob_error", "sft_reason", "sft_eval", "sft_score", "grad_norm", "lr", "tokens_per_s", "loss"]


def run(tmp_path, *extra):
    out = tmp_path / "run"
    train.main([*TINY, "--out", str(out), *extra])
    return out


@pytest.mark.parametrize("phase", ["sft", "rl", "hybrid"])
def test_phase_writes_outputs(tmp_path, phase):
    out = run(tmp_path, "--phase", phase)
    summary = json.loads((out / "summary.json").read_text())
    for key in SUMMARY_KEYS:
        assert key in summary, key
    assert summary["eval_examples"] == 4
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected_steps = 2 if phase == "sft" else 3 + 2
    assert [s["step"] for s in steps] == list(range(1, expected_steps + 1))
    assert all(s["phase"] == phase for s in steps[-2:])
    assert (out / "run_config.json").is_file()
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert len((out / "eval_samples.jsonl").read_text().splitlines()) == 4


def test_rl_phase_reports_warmup(tmp_path, caplog):
    caplog.set_level("INFO")
    out = run(tmp_path, "--phase", "rl")
    assert "running 3 dual-track SFT steps before rl" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    assert "after_sft_warmup" in summary


def test_hybrid_logs_rl_metrics(tmp_path):
    out = run(tmp_path, "--phase", "hybrid")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    for key in HYBRID_METRICS:
        assert key in last, key
    track = json.loads((out / "summary.json").read_text())["evaluation_track"]
    assert track["added_samples"] == 4  # one refresh of 2 answers in the warm-up, one in the hybrid steps


def test_rollouts_feed_evaluation_track(tmp_path):
    out = run(tmp_path, "--phase", "hybrid", "--eval-track-from-rollouts")
    track = json.loads((out / "summary.json").read_text())["evaluation_track"]
    assert track["added_samples"] == 4 + 2 * 2 * 2  # plus 2 steps x 2 prompts x 2 samples


def test_saved_model_reloads(tmp_path):
    out = run(tmp_path, "--phase", "sft")
    model = load_pretrained(out / "model")
    generation = json.loads((out / "model" / "generation_config.json").read_text())
    assert len(generation["eos_token_id"]) == 2
    assert model.config.num_hidden_layers == 2


def without_warmup_steps(flags: list[str]) -> list[str]:
    position = flags.index("--warmup-steps")
    return flags[:position] + flags[position + 2:]


def test_init_from_saved_model(tmp_path):
    first = run(tmp_path, "--phase", "sft")
    second = tmp_path / "second"
    train.main([*without_warmup_steps(TINY), "--phase", "hybrid", "--init", str(first / "model"), "--out", str(second)])
    steps = (second / "metrics.jsonl").read_text().splitlines()
    assert len(steps) == 2  # with --init and no --warmup-steps there is no SFT warm-up
    reloaded = load_pretrained(second / "model")
    assert reloaded.config.vocab_size == load_pretrained(first / "model").config.vocab_size


def test_init_with_warmup_steps(tmp_path):
    first = run(tmp_path, "--phase", "sft")
    second = tmp_path / "second"
    train.main([*TINY, "--phase", "rl", "--init", str(first / "model"), "--out", str(second)])
    steps = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [s["phase"] for s in steps] == ["sft"] * 3 + ["rl"] * 2
    assert "after_sft_warmup" in json.loads((second / "summary.json").read_text())


def test_no_post_completion_run(tmp_path):
    out = run(tmp_path, "--phase", "hybrid", "--no-post-completion")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["post_completion"] is False
    for key in ("reward_prediction_accuracy", "prediction_rate", "reward_mae", "correctness_auroc",
                "correctness_ece"):
        assert summary[key] is None, key
    assert summary["evaluation_track"]["pool_right"] + summary["evaluation_track"]["pool_wrong"] == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("reward_consistency" not in s for s in steps)
    assert all(s["sft_eval"] == 0.0 for s in steps)
    records = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert all(r["post_completion"] is None for r in records)
    assert all("<post-completion>" not in r["completion"] for r in records)


def test_no_post_completion_warns_of_ignored_options(caplog):
    caplog.set_level("WARNING")
    args = train.parse_args(["--no-post-completion", "--w-con", "2", "--lambda-eval", "0.5", "--steps", "3"])
    assert not args.post_completion
    assert "--no-post-completion: ignoring --lambda-eval, --w-con" in caplog.text
    assert "--steps" not in caplog.text


@pytest.mark.parametrize("flags, warned", [(["--temperature", "0"], True), (["--temperature", "0.7"], False),
                                           (["--temperature", "0", "--phase", "sft"], False)])
def test_greedy_rollouts_warn(caplog, flags, warned):
    caplog.set_level("WARNING")
    train.parse_args(flags)
    assert ("--temperature 0 samples greedily" in caplog.text) == warned


def test_metrics_count_tokens(tmp_path):
    out = run(tmp_path, "--phase", "sft")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(s["tokens"], int) and s["tokens"] > 0 for s in steps)
    assert all(math.isclose(s["tokens_per_s"], s["tokens"] / s["dt"]) for s in steps)


def test_eval_examples_zero_takes_all(tmp_path):
    out = run(tmp_path, "--phase", "sft", "--data", "gsm8k", "--data-dir", str(FIXTURES / "gsm8k"),
              "--eval-examples", "0")
    assert json.loads((out / "summary.json").read_text())["eval_examples"] == 2  # the whole fixture split


def test_gsm8k_fixture_runs(tmp_path):
    out = run(tmp_path, "--phase", "hybrid", "--data", "gsm8k", "--data-dir", str(FIXTURES / "gsm8k"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == "gsm8k"
    assert summary["eval_examples"] == 2  # the fixture's test split has two rows


def test_rejects_group_of_one(tmp_path):
    with pytest.raises(SystemExit):
        run(tmp_path, "--phase", "rl", "--group-size", "1")


def test_config_file_sets_options(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('phase = "sft"\nlambda-eval = 0.5\nsteps = 7\n')
    out = tmp_path / "run"
    train.main([*TINY, "--config", str(config), "--out", str(out)])
    resolved = json.loads((out / "run_config.json").read_text())
    assert resolved["phase"] == "sft"
    assert resolved["lambda_eval"] == 0.5
    assert resolved["steps"] == 2  # the command line wins over the file


def test_same_seed_same_losses(tmp_path):
    first = run(tmp_path / "a", "--phase", "hybrid")
    second = run(tmp_path / "b", "--phase", "hybrid")
    losses = [[json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
              for out in (first, second)]
    assert losses[0] == losses[1]
    torch.testing.assert_close(load_pretrained(first / "model").lm_head.weight,
                               load_pretrained(second / "model").lm_head.weight)


def test_grpo_settings_logged_and_used(tmp_path):
    out = run(tmp_path, "--phase", "rl", "--inner-steps", "2", "--micro-batch-size", "3", "--clip-low", "0.1",
              "--clip-high", "0.3", "--kl-estimator", "k1", "--no-kl-on-flat-groups", "--loss-agg",
              "seq-mean-token-sum-norm", "--mask-truncated", "--no-scale-rewards", "--split-advantage")
    config = json.loads((out / "run_config.json").read_text())
    assert (config["inner_steps"], config["micro_batch_size"], config["clip_low"], config["clip_high"]) == (2, 3, 0.1, 0.3)
    assert (config["kl_estimator"], config["kl_on_flat_groups"], config["loss_agg"]) == ("k1", False, "seq-mean-token-sum-norm")
    assert config["mask_truncated"]
    assert not config["scale_rewards"]
    assert config["split_advantage"]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(s["loss"]) for s in steps)


@pytest.mark.parametrize("flags, message", [
    (["--clip-low", "1.0"], "--clip-low must be below 1"),
    (["--clip-high", "0"], "--clip-high must be positive"),
    (["--inner-steps", "0"], "--inner-steps must be at least 1"),
    (["--micro-batch-size", "-1"], "--micro-batch-size must be at least 0"),
    (["--loss-agg", "mean"], "invalid choice"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--warmup-lr", "inf"], "--warmup-lr must be a finite number, got inf"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--kl-coef", "inf"], "--kl-coef must be a finite number"),
])
def test_rejects_bad_grpo_settings(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        run(tmp_path, "--phase", "rl", *flags)
    assert message in capsys.readouterr().err


def test_rejects_tokenizer_file_in_out(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tokenizer").write_text("not a folder")
    with pytest.raises(SystemExit):
        train.main([*TINY, "--out", str(out)])
    assert f"{out / 'tokenizer'} is not a directory" in capsys.readouterr().err
    assert (out / "tokenizer").read_text() == "not a folder"


def test_config_rejects_option_set_twice(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("warmup_steps = 4\nwarmup-steps = 3\n")
    with pytest.raises(SystemExit):
        run(tmp_path, "--config", str(config))
    assert "'warmup_steps' and 'warmup-steps' set the same option" in capsys.readouterr().err


def test_help_shows_zero_defaults(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "seed for data order, initialisation and sampling (default: 0)" in text
    assert "AdamW weight decay (default: 0.0)" in text


def test_resume_rejects_changed_stage_plan(tmp_path, monkeypatch):
    out = run(tmp_path, "--phase", "rl")  # an SFT warm-up stage, then the rl stage
    # as if the code that plans the stages had changed since the run: no warm-up any more
    monkeypatch.setattr(train, "plan_stages", lambda args: [train.Stage("rl", args.steps, args.lr)])
    with pytest.raises(SystemExit) as raised:
        train.main(["--resume", "--out", str(out)])
    message = str(raised.value.code)
    assert "stage 1 of the run was rl for 2 steps, but the options now plan no such stage" in message


def test_compile_decode_reaches_generate(tmp_path, monkeypatch):
    # --compile-decode must reach every generate call of a hybrid run: rollouts and evaluation-track samples
    seen = []
    real = train.generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("compile", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "generate", spy)
    monkeypatch.setattr("pcl.grpo.generate", spy)
    out = run(tmp_path, "--phase", "hybrid", "--compile-decode")
    assert seen and all(seen), seen
    assert json.loads((out / "summary.json").read_text())["steps"] > 0


def test_compile_layers_reaches_the_training_forward(tmp_path, monkeypatch):
    # --compile-layers must reach the training forward passes. Eager replaces the compiled function here.
    import model.transformer as transformer_module
    calls = []
    monkeypatch.setattr(transformer_module, "_layer_compiled",
                        lambda *args: calls.append(1) or transformer_module._layer(*args))
    run(tmp_path, "--phase", "hybrid", "--compile-layers")
    assert calls


def test_config_value_starting_with_dash(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('out = "--steps"\n')
    assert train.parse_args(["--config", str(config)]).out == "--steps"


def tokenizer_inputs():
    """Return the options, training rows and reward weights that scratch_tokenizer takes, for a tiny run."""
    args = train.parse_args(["--preset", "tiny", "--train-examples", "40", "--vocab-size", "300"])
    rows = train.load_rows(args.data, "train", args.data_dir, limit=args.train_examples, seed=args.seed)
    weights = train.rewards.RewardWeights(args.w_acc, args.w_fmt, args.w_con, args.graded_consistency)
    return args, rows, weights


def test_tokenizer_cache_reused_and_invalidated(tmp_path, monkeypatch):
    args, rows, weights = tokenizer_inputs()
    first = train.scratch_tokenizer(args, rows, weights, tmp_path)
    stamp = tmp_path / "tokenizer" / "trained_on.json"
    assert stamp.is_file()

    def no_training(*_):
        raise AssertionError("the cached tokenizer should have been used")
    with monkeypatch.context() as m:
        m.setattr(train, "train_tokenizer", no_training)
        assert train.scratch_tokenizer(args, rows, weights, tmp_path).vocab_size == first.vocab_size

    # A save cut short leaves no stamp, so the next run trains again instead of reading a broken file.
    (tmp_path / "tokenizer" / "tokenizer.json").unlink()

    def broken_save(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{")
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(train.Tokenizer, "save", broken_save)
        with pytest.raises(KeyboardInterrupt):
            train.scratch_tokenizer(args, rows, weights, tmp_path)
    assert not stamp.exists()
    assert train.scratch_tokenizer(args, rows, weights, tmp_path).vocab_size == first.vocab_size


@pytest.mark.parametrize("damage, reason", [
    ("trained_on.json", "has an unreadable trained_on.json"),
    ("tokenizer_config.json", "lacks tokenizer_config.json"),
    ("tokenizer.json", "cannot be read"),
])
def test_damaged_tokenizer_cache_retrained(tmp_path, caplog, damage, reason):
    args, rows, weights = tokenizer_inputs()
    first = train.scratch_tokenizer(args, rows, weights, tmp_path)
    path = tmp_path / "tokenizer" / damage
    if damage == "tokenizer_config.json":
        path.unlink()  # without this file the pad token falls back to another id
    else:
        path.write_text(path.read_text()[:10])  # cut short
    caplog.set_level("WARNING")
    again = train.scratch_tokenizer(args, rows, weights, tmp_path)
    assert reason in caplog.text
    assert "training a new one" in caplog.text
    assert (again.pad_id, again.eos_id, again.vocab_size) == (first.pad_id, first.eos_id, first.vocab_size)

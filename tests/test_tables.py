"""eval.tables: the method recipes, the table from finished cells, and a tiny sweep end to end."""

import json
import os
import shlex

import pytest

import train
from eval import tables
from eval.tables import METHODS, START, plan_cells

# Sizes that make each train.py run take seconds: the tiny model, short answers, few rows.
TINY_TRAIN = ("--preset tiny --train-examples 40 --max-new-tokens 24 --max-evaluation-tokens 12 --no-compile "
              "--cold-start-examples 8 --eval-track-samples 2 --sample-every 2 --log-every 1")
TINY = ["--data", "synthetic", "--seeds", "1", "--budget", "2", "--prompts-per-step", "2", "--group-size", "2",
        "--base-steps", "3", "--eval-examples", "4", "--train-args", TINY_TRAIN]


def sweep_args(tmp_path, *extra):
    return tables.parse_args([*TINY, "--results", str(tmp_path / "results"), *extra])


def resolved(cell) -> dict:
    return vars(train.parse_args(cell.flags))


# recipes


def test_methods_share_start_and_budget(tmp_path):
    args = sweep_args(tmp_path, "--methods", ",".join(METHODS), "--budget", "10")
    cells = plan_cells(args)
    start = next(c for c in cells if c.method == START)
    methods = [c for c in cells if c.method != START]
    assert [c.method for c in methods] == list(METHODS)
    for cell in methods:
        options = resolved(cell)
        assert options["init"] == str(start.folder / "model"), cell.method
        assert options["warmup_steps"] + options["steps"] == 10, cell.method
        assert options["batch_size"] == 2, cell.method
        assert options["prompts_per_step"] == 2, cell.method
        assert options["group_size"] == 2, cell.method
        assert options["lr"] == (args.sft_lr if options["phase"] == "sft" else args.rl_lr), cell.method
        assert options["warmup_lr"] == args.sft_lr, cell.method
        assert options["seed"] == 0, cell.method
        assert options["post_completion"] == cell.method.startswith("pcl-"), cell.method
        if options["post_completion"] and cell.method != "pcl-no-eval-track":  # the ablation has none
            assert options["eval_track_batch_size"] == 2, cell.method


@pytest.mark.parametrize("method, phase, warmup, steps", [
    ("sft", "sft", 0, 10), ("grpo", "rl", 0, 10), ("sft-grpo", "rl", 5, 5), ("pcl-sft", "sft", 0, 10),
    ("pcl-rl", "rl", 5, 5), ("pcl-hybrid", "hybrid", 5, 5), ("pcl-no-eval-track", "hybrid", 5, 5),
    ("pcl-no-consistency", "hybrid", 5, 5),
])
def test_method_recipe(tmp_path, method, phase, warmup, steps):
    args = sweep_args(tmp_path, "--methods", method, "--budget", "10")
    options = resolved(plan_cells(args)[1])
    assert (options["phase"], options["warmup_steps"], options["steps"]) == (phase, warmup, steps)


def test_ablation_options(tmp_path):
    args = sweep_args(tmp_path, "--methods", "pcl-hybrid,pcl-no-eval-track,pcl-no-consistency")
    hybrid, no_eval_track, no_consistency = (resolved(c) for c in plan_cells(args)[1:])
    assert no_eval_track["eval_track_batch_size"] == 0
    assert no_eval_track["lambda_score"] == 0
    assert no_eval_track["sample_every"] == 0
    assert no_consistency["w_con"] == 0
    assert hybrid["w_con"] == 1
    # nothing else differs from pcl-hybrid
    for ablation, changed in ((no_eval_track, {"eval_track_batch_size", "lambda_score", "lambda_eval", "sample_every",
                                               "cold_start_examples"}), (no_consistency, {"w_con"})):
        differing = {k for k in hybrid if hybrid[k] != ablation[k]} - {"out"}
        assert differing == changed


def test_cell_options_given_once(tmp_path):
    # a repeated flag would let the later value win silently and make the command misleading to read.
    # Without --train-args: a method's own options are meant to override those.
    args = tables.parse_args(["--data", "synthetic", "--seeds", "1", "--methods", ",".join(METHODS),
                              "--results", str(tmp_path / "results")])
    for cell in plan_cells(args):
        options = [flag for flag in cell.flags if flag.startswith("--")]
        repeated = sorted({flag for flag in options if options.count(flag) > 1})
        assert repeated == [], cell.method


def test_start_model_recipe(tmp_path):
    args = sweep_args(tmp_path)
    options = resolved(plan_cells(args)[0])
    assert options["phase"] == "sft"
    assert options["post_completion"] is False
    assert options["steps"] == 3
    assert options["init"] is None


def test_init_is_evaluated_as_start(tmp_path):
    init = tmp_path / "base"
    init.mkdir()
    cells = plan_cells(sweep_args(tmp_path, "--init", str(init)))
    assert cells[0].flags == []
    assert cells[0].command[1:3] == ["-m", "eval.evaluate"]
    assert "--no-post-completion" in cells[0].command
    assert resolved(cells[1])["init"] == str(init.resolve())


def test_torchrun_launcher(tmp_path):
    cells = plan_cells(sweep_args(tmp_path, "--nproc-per-node", "4"))
    assert cells[1].command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]


@pytest.mark.parametrize("flags, words", [
    (["--methods", "sft,ppo"], ["--methods: unknown or missing names ['ppo']"]),
    (["--methods", "sft,sft"], ["--methods: a name is listed twice"]),
    (["--data", "gsm8k"], ["--data gsm8k reads local files: pass --data-root"]),
    (["--budget", "1", "--methods", "sft-grpo"], ["--budget must be at least 2"]),
    (["--seeds", "0"], ["--seeds must be at least 1"]),
    (["--sft-lr", "nan"], ["--sft-lr must be a positive finite number"]),
    (["--rl-lr", "0"], ["--rl-lr must be a positive finite number"]),
    (["--init", "/nonexistent/model"], ["--init /nonexistent/model: folder not found"]),
])
def test_rejects_bad_options(capsys, flags, words):
    with pytest.raises(SystemExit):
        tables.parse_args(flags)
    message = capsys.readouterr().err
    for word in words:
        assert word in message


# tables from finished cells


def finish(cell, metrics: dict, steps: dict | None = None):
    """Make `cell` look finished: its run_config.json, summary.json and metrics.jsonl."""
    cell.folder.mkdir(parents=True, exist_ok=True)
    (cell.folder / "run_config.json").write_text(json.dumps(resolved(cell)))
    (cell.folder / "summary.json").write_text(json.dumps(metrics))
    (cell.folder / "timing.json").write_text(json.dumps({"wall_seconds": 10.0}))
    lines = [json.dumps({"step": i, "phase": phase, "tokens": 100})
             for phase, count in (steps or {"sft": 2}).items() for i in range(count)]
    (cell.folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def metrics(accuracy, tokens, post_completion=True, rpa=0.5):
    values = {"accuracy": accuracy, "format_rate": 1.0, "tokens_per_answer": tokens, "reward_prediction_accuracy": rpa,
              "reward_mae": 0.5, "correctness_auroc": 0.75, "correctness_ece": 0.125}
    if not post_completion:
        for key in ("reward_prediction_accuracy", "reward_mae", "correctness_auroc", "correctness_ece"):
            values[key] = None
    return values


def test_table_from_finished_cells(tmp_path):
    args = sweep_args(tmp_path, "--seeds", "2", "--methods", "sft,pcl-sft,pcl-hybrid")
    cells = {(c.method, c.seed): c for c in plan_cells(args)}
    finish(cells[START, 0], metrics(0.5, 20.0, post_completion=False))
    finish(cells[START, 1], metrics(0.7, 20.0, post_completion=False))
    finish(cells["sft", 0], metrics(0.6, 20.0, post_completion=False))
    finish(cells["sft", 1], metrics(0.8, 20.0, post_completion=False))
    finish(cells["pcl-sft", 0], metrics(0.7, 21.0, rpa=0.25), {"sft": 2})
    finish(cells["pcl-sft", 1], metrics(0.9, 21.0, rpa=0.75), {"sft": 2})
    finish(cells["pcl-hybrid", 0], {**metrics(0.9, 20.0), "reward_mae": None})  # seed 1 is not finished
    tables.write_tables(args, list(cells.values()), 60.0)

    folder = tmp_path / "results" / "synthetic"
    text = (folder / "table.md").read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| sft | 0.700 ± 0.141 | 1.000 ± 0.000 | n/a | n/a | n/a | n/a | 20.0 ± 0.0 |" in text
    assert rows["pcl-sft"].split(" | ")[3] == "0.500 ± 0.354"  # RPA of 0.25 and 0.75
    assert "0.900 (1/2 seeds)" in rows["pcl-hybrid"]
    assert rows["pcl-hybrid"].split(" | ")[4] == "none"  # MAE without any parsable prediction
    assert rows["sft"].split(" | ")[4] == "n/a"
    assert "The cells' own wall times add up to 1.2 min." in text  # 7 finished cells of 10 s
    assert "Tokens per answer on synthetic relative to sft: start +0.0%, pcl-sft +5.0%, pcl-hybrid +0.0%." in text
    assert "| synthetic | pcl-sft | sft 2 | 200 | 10 |" in text

    content = json.loads((folder / "table.json").read_text())
    accuracy = content["table"]["synthetic"]["sft"]["accuracy"]
    assert accuracy["values"] == [0.6, 0.8]
    assert accuracy["mean"] == pytest.approx(0.7)
    assert content["table"]["synthetic"]["pcl-hybrid"]["accuracy"]["values"] == [0.9, None]
    assert content["tokens_per_answer_vs_sft"]["synthetic"]["pcl-sft"] == pytest.approx(1.05)
    assert content["options"]["budget"] == 2
    assert "cpu_count" in content["machine"]
    assert content["machine"]["memory_gib"] > 0


def test_accuracy_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra; the plot is skipped without it")
    args = sweep_args(tmp_path, "--methods", "sft")
    cells = plan_cells(args)
    finish(cells[0], metrics(0.5, 20.0, post_completion=False))
    finish(cells[1], metrics(0.6, 20.0, post_completion=False))
    tables.write_tables(args, cells, 1.0)
    assert (tmp_path / "results" / "synthetic" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_plot_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_matplotlib)
    args = sweep_args(tmp_path, "--methods", "sft")
    assert tables.plot_accuracy(args, tables.build_table(args, plan_cells(args)), tmp_path / "a.png") is False
    assert not (tmp_path / "a.png").exists()


def test_dry_run_resumes_interrupted_cell(tmp_path, capsys):
    args = sweep_args(tmp_path, "--methods", "sft,pcl-sft")
    cells = plan_cells(args)
    finish(cells[0], metrics(0.5, 20.0, post_completion=False))
    cells[1].folder.mkdir(parents=True)
    (cells[1].folder / "run_config.json").write_text("{}")  # started, no summary.json: interrupted
    tables.main([*TINY, "--results", str(tmp_path / "results"), "--methods", "sft,pcl-sft", "--dry-run"])
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert len(commands) == 2  # the finished starting model is left out
    assert commands[0][-1] == "--resume"
    assert commands[0][commands[0].index("--out") + 1] == str(cells[1].folder)
    assert "--resume" not in commands[1]


# the sweep end to end


def test_tiny_sweep_then_rerun_skips(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    command = [*TINY, "--results", str(tmp_path / "results"), "--methods", "sft,pcl-hybrid"]
    caplog.set_level("INFO")
    tables.main(command)

    folder = tmp_path / "results" / "synthetic"
    runs = folder / "runs" / "synthetic"
    for method in (START, "sft", "pcl-hybrid"):
        assert (runs / method / "seed-0" / "summary.json").is_file(), method
        assert json.loads((runs / method / "seed-0" / "timing.json").read_text())["wall_seconds"] > 0, method
        assert (runs / method / "seed-0" / "model" / "model.safetensors").is_file(), method
        assert not (runs / method / "seed-0" / "checkpoints").exists(), method
    sft = json.loads((runs / "sft" / "seed-0" / "summary.json").read_text())
    hybrid = json.loads((runs / "pcl-hybrid" / "seed-0" / "summary.json").read_text())
    assert sft["post_completion"] is False
    assert sft["reward_prediction_accuracy"] is None
    assert hybrid["post_completion"] is True
    assert hybrid["reward_prediction_accuracy"] is not None
    text = (folder / "table.md").read_text()
    for row in ("| start |", "| sft |", "| pcl-hybrid |"):
        assert row in text
    content = json.loads((folder / "table.json").read_text())
    assert all(cell["finished"] for cell in content["cells"])
    hybrid_cell = next(c for c in content["cells"] if c["method"] == "pcl-hybrid")
    assert hybrid_cell["steps"] == {"sft": 1, "hybrid": 1}  # the cold start, then the hybrid half

    # the same command again skips every cell and trains nothing
    stamps = {path: path.stat().st_mtime_ns for path in runs.glob("*/seed-0/summary.json")}
    caplog.clear()
    tables.main(command)
    assert caplog.text.count("finished, skipped") == 3
    assert "running" not in caplog.text
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps

    # another budget for the same results folder is rejected, so rows never mix budgets
    with pytest.raises(SystemExit) as raised:
        tables.main([*command, "--budget", "3"])
    assert "was trained with other options" in str(raised.value.code)
    assert "--steps is 3 but the run used 2" in str(raised.value.code)


def test_failed_cell_is_reported(tmp_path, caplog):
    caplog.set_level("INFO")
    # an invalid train.py option makes the starting model fail, and its methods are left out
    command = [*TINY, "--results", str(tmp_path / "results"), "--methods", "sft",
               "--train-args", TINY_TRAIN + " --vocab-size 10"]
    with pytest.raises(SystemExit) as raised:
        tables.main(command)
    assert "2 cells did not finish" in str(raised.value.code)
    assert "synthetic/start/seed-0 failed with exit code 2" in caplog.text
    assert "--vocab-size must be at least 300" in caplog.text
    assert "synthetic/sft/seed-0: left out" in caplog.text
    assert os.path.isfile(tmp_path / "results" / "synthetic" / "table.md")


@pytest.mark.parametrize("train_args, named", [
    ("--steps 5", "--steps"), ("--lr=0.1", "--lr"), ("--no-post-completion", "--post-completion"),
    ("--kl-coef 0.1 --seed 3", "--seed"),
])
def test_train_args_cannot_change_budget(capsys, train_args, named):
    with pytest.raises(SystemExit):
        tables.parse_args([f"--train-args={train_args}"])
    assert f"--train-args: {named} are set by the tables" in capsys.readouterr().err


def test_init_sweep_evaluates_start(tmp_path, tok, make_model, monkeypatch):
    from model.checkpoint import save_pretrained

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    init = tmp_path / "init"
    save_pretrained(make_model(vocab_size=tok.vocab_size), tok, init)
    tables.main([*TINY, "--results", str(tmp_path / "results"), "--methods", "sft", "--init", str(init)])
    runs = tmp_path / "results" / "synthetic" / "runs" / "synthetic"
    start = json.loads((runs / START / "seed-0" / "summary.json").read_text())
    assert start["checkpoint"] == str(init.resolve())
    assert start["settings"]["post_completion"] is False
    assert start["metrics"]["eval_examples"] == 4
    assert json.loads((runs / "sft" / "seed-0" / "run_config.json").read_text())["init"] == str(init.resolve())
    content = json.loads((tmp_path / "results" / "synthetic" / "table.json").read_text())
    assert content["table"]["synthetic"][START]["seeds_finished"] == 1

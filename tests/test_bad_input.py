"""Bad input to train.py: each case must stop with a message that names the file, the line or
record, and the field (or the option) and gives the fix, never with a traceback."""

import json
import shutil
from pathlib import Path

import pytest

import train
from conftest import random_model
from model.checkpoint import save_pretrained
from model.config import ModelConfig
from test_train import TINY

FIXTURES = Path(__file__).parent / "fixtures"
GOOD_GSM8K = json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2.\n#### 2"})


# case set-ups: each writes what it needs under `tmp` and returns the extra train.py flags


def gsm8k_with(line: str | None = None, text: str | None = None):
    """A gsm8k folder whose train.jsonl is `text`, or a good line followed by `line`."""
    def setup(tmp: Path, tok) -> list[str]:
        folder = tmp / "gsm8k"
        shutil.copytree(FIXTURES / "gsm8k", folder)
        (folder / "train.jsonl").write_text(text if text is not None else f"{GOOD_GSM8K}\n{line}\n")
        return ["--data", "gsm8k", "--data-dir", str(folder)]
    return setup


def gsm8k_without_train_file(tmp: Path, tok) -> list[str]:
    folder = tmp / "gsm8k"
    folder.mkdir()
    return ["--data", "gsm8k", "--data-dir", str(folder)]


def mathqa_with(record: dict):
    def setup(tmp: Path, tok) -> list[str]:
        folder = tmp / "mathqa"
        shutil.copytree(FIXTURES / "mathqa", folder)
        records = json.loads((folder / "dev.json").read_text())
        (folder / "dev.json").write_text(json.dumps(records[:1] + [{**records[0], **record}]))
        return ["--data", "mathqa", "--data-dir", str(folder)]
    return setup


def strategyqa_with(record: dict):
    def setup(tmp: Path, tok) -> list[str]:
        folder = tmp / "strategyqa"
        shutil.copytree(FIXTURES / "strategyqa", folder)
        records = json.loads((folder / "strategyQA_train.json").read_text())
        (folder / "strategyQA_train.json").write_text(json.dumps(records[:1] + [{**records[0], **record}]))
        return ["--data", "strategyqa", "--data-dir", str(folder)]
    return setup


def model_folder(change=None, vocab_size: int | None = None):
    """A tiny HF model folder with the test tokenizer, then `change(folder)` applied to it."""
    def setup(tmp: Path, tok) -> list[str]:
        folder = tmp / "model"
        model = random_model(ModelConfig.from_preset("tiny", vocab_size=vocab_size or tok.vocab_size))
        save_pretrained(model, None, folder)
        tok.save(folder)
        if change is not None:
            change(folder)
        return ["--init", str(folder)]
    return setup


def edit_config(**fields):
    def change(folder: Path):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **fields}))
    return change


def truncate_weights(folder: Path):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:200])


def flags(*values: str):
    return lambda tmp, tok: list(values)


def config_file(text: str | bytes):
    def setup(tmp: Path, tok) -> list[str]:
        if isinstance(text, bytes):
            (tmp / "run.toml").write_bytes(text)
        else:
            (tmp / "run.toml").write_text(text)
        return ["--config", str(tmp / "run.toml")]
    return setup


CASES = [
    # (case, set-up, words the message must contain)
    ("dataset file missing", gsm8k_without_train_file,
     ["train.jsonl: file not found", "--data-dir must be the folder that contains train.jsonl"]),
    ("dataset file empty", gsm8k_with(text=""), ["train.jsonl: file is empty", "expected JSON Lines"]),
    ("invalid JSON on line 2", gsm8k_with('{"question": "q", "answer": '),
     ["train.jsonl:2: invalid JSON at column", "fix or remove this line", "--skip-bad-rows"]),
    ("row without question", gsm8k_with(json.dumps({"answer": "x\n#### 1"})),
     ["train.jsonl:2: field 'question' is missing", "fix or remove this record"]),
    ("row without answer", gsm8k_with(json.dumps({"question": "q"})),
     ["train.jsonl:2: field 'answer' is missing", "fix or remove this record"]),
    ("answer of wrong type", gsm8k_with(json.dumps({"question": "q", "answer": 5})),
     ["train.jsonl:2: field 'answer' must be a string, got a number"]),
    ("row not an object", gsm8k_with("[1, 2]"),
     ["train.jsonl:2: record is an array, expected a JSON object"]),
    ("empty question", gsm8k_with(json.dumps({"question": " ", "answer": "x\n#### 1"})),
     ["train.jsonl:2: field 'question' is empty"]),
    ("gsm8k answer without ####", gsm8k_with(json.dumps({"question": "q", "answer": "x = 1"})),
     ["train.jsonl:2: field 'answer' has no '####' line", "must end with '#### <final answer>'"]),
    ("mathqa correct not an option", mathqa_with({"options": "a ) 1 , b ) 2", "correct": "e"}),
     ["dev.json[1]: field 'correct' is 'e', which is not one of the option letters a, b"]),
    ("mathqa options unparsable", mathqa_with({"options": "1 , 2 , 3"}),
     ["dev.json[1]: field 'options' could not be parsed", "expected 'a ) ... , b ) ..."]),
    ("strategyqa answer not a boolean", strategyqa_with({"answer": "yes"}),
     ["strategyQA_train.json[1]: field 'answer' must be a boolean (true or false), got a string"]),
    ("strategyqa facts not a list", strategyqa_with({"facts": "Water is wet."}),
     ["strategyQA_train.json[1]: field 'facts' must be a list of strings"]),
    ("unknown dataset name", flags("--data", "gsm9k"), ["--data: invalid choice: 'gsm9k'"]),
    ("dataset without --data-dir", flags("--data", "gsm8k"), ["--data gsm8k reads local files: pass --data-dir"]),
    ("data folder not found", flags("--data", "gsm8k", "--data-dir", "/nonexistent/gsm8k"),
     ["--data-dir /nonexistent/gsm8k: directory not found"]),
    ("model folder without config.json", model_folder(lambda folder: (folder / "config.json").unlink()),
     ["config.json: config.json not found; expected an HF model folder"]),
    ("config.json not JSON", model_folder(lambda folder: (folder / "config.json").write_text("{broken")),
     ["config.json: invalid JSON", "restore the model's config.json"]),
    ("config.json field of wrong type", model_folder(edit_config(hidden_size="32")),
     ["config.json: field 'hidden_size' must be an integer, got '32'; fix config.json"]),
    ("unsupported architecture", model_folder(edit_config(architectures=["MistralForCausalLM"])),
     ["config.json: field 'architectures': unsupported architecture 'MistralForCausalLM'; supported:"]),
    ("weight file truncated", model_folder(truncate_weights),
     ["model.safetensors: cannot read weights", "copy or export the model again"]),
    ("weights of another shape", model_folder(edit_config(num_hidden_layers=3)),
     ["weights do not match config.json", "the folder needs the config.json saved with these weights: missing (9)"]),
    ("tokenizer.json missing", model_folder(lambda folder: (folder / "tokenizer.json").unlink()),
     ["tokenizer.json: tokenizer.json not found in the model folder; copy the model's tokenizer.json into it"]),
    ("tokenizer larger than the model", model_folder(vocab_size=64),
     ["tokenizer.json has ids up to", "embedding matrix has 64 rows", "put the model's own tokenizer.json"]),
    ("group size below 2", flags("--phase", "rl", "--group-size", "1"),
     ["--group-size must be at least 2 for GRPO"]),
    ("negative learning rate", flags("--lr", "-0.001"), ["--lr must be positive, got -0.001"]),
    ("zero steps", flags("--steps", "0"), ["--steps must be at least 1, got 0"]),
    ("no checkpoints kept", flags("--keep", "0"), ["--keep must be at least 1, got 0"]),
    ("negative save interval", flags("--save-every", "-5"), ["--save-every must be at least 0, got -5"]),
    ("resume of a missing run", flags("--resume", "--out", "/nonexistent/run"),
     ["run_config.json not found, so --out /nonexistent/run contains no run to resume",
      "start the run without --resume"]),
    ("unknown option in --config", config_file("learning_rate = 0.1\n"),
     ["run.toml, line 1: unknown option 'learning_rate'; see --help"]),
    ("--config value of wrong type", config_file('lr = 0.1\nsteps = "ten"\n'),
     ["run.toml, line 2: invalid value 'ten' for 'steps': expected int"]),
    ("--config switch given a number", config_file("compile = 3\n"),
     ["run.toml, line 1: invalid value 3 for 'compile': expected true or false"]),
    ("--config value given true", config_file("steps = true\n"),
     ["run.toml, line 1: invalid value True for 'steps': expected a value, not true or false"]),
    ("--config value not a choice", config_file('\n"phase" = "xx"\n'),
     ["run.toml, line 2: invalid value 'xx' for 'phase': expected one of sft, rl, hybrid"]),
    ("--config not UTF-8", config_file(b"steps = 2\x80\n"), ["run.toml: invalid TOML"]),
    ("--config value out of range", config_file("lr = 0.1\npool-size = 0\n"),
     ["--pool-size must be at least 1, got 0 (set in --config", "run.toml, line 2)"]),
    ("--config list value", config_file('dtype = ["bfloat16"]\n'),
     ["run.toml, line 1: invalid value ['bfloat16'] for 'dtype': expected a single value"]),
    ("--config not TOML", config_file("steps = = 3\n"), ["run.toml: invalid TOML"]),
]


@pytest.mark.parametrize("setup, words", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_rejected(tmp_path, capsys, tok, setup, words):
    with pytest.raises(SystemExit) as raised:
        train.main([*TINY, "--out", str(tmp_path / "run"), *setup(tmp_path, tok)])
    code = raised.value.code
    message = (code if isinstance(code, str) else "") + capsys.readouterr().err
    assert code not in (0, None)
    assert "Traceback" not in message
    for word in words:
        assert word in message


def test_skip_bad_rows_counts(tmp_path, caplog):
    folder = tmp_path / "gsm8k"
    shutil.copytree(FIXTURES / "gsm8k", folder)
    with open(folder / "train.jsonl", "a") as f:
        f.write('{"question": "q", "answer": \n' + json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    out = tmp_path / "run"
    train.main([*TINY, "--phase", "sft", "--data", "gsm8k", "--data-dir", str(folder), "--skip-bad-rows",
                "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_rows"] == 2
    assert "--skip-bad-rows: skipping " in caplog.text
    assert "train.jsonl:5: invalid JSON" in caplog.text  # line 4 of the fixture is blank
    assert "--skip-bad-rows: skipped 2 invalid rows" in caplog.text

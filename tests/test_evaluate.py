"""eval.evaluate: answers with and without post-completion, the probability of correctness, the CLI."""

import json
from pathlib import Path

import pytest
import torch

from data import Row, format_prompt
from eval import evaluate as evaluate_module
from eval.evaluate import answer_and_grade, evaluate, expected_accuracy, score_distributions
from model.checkpoint import save_pretrained
from model.config import ModelConfig
from model.transformer import Transformer
from pcl import rewards
from pcl.losses import token_cross_entropy
from pcl.sequence import (COMPLETION, collate, evaluation_track, prompt_ids, reasoning_track, target_mask)
from pcl.sft import ScoreHead, gold_completion

ROW = Row(question="Ann has 12 apples. She buys 7 more. How many apples does Ann have now?",
          answer="19", reasoning="12 + 7 = 19.", source="test:0")
WEIGHTS = rewards.RewardWeights()
FIXTURES = Path(__file__).parent / "fixtures"


def memorize(tok, sequence) -> Transformer:
    """A tiny model trained until it writes `sequence` greedily after its prompt."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    model.init_weights(seed=0)
    input_ids, segment_ids = collate([sequence], tok.pad_id)
    mask = target_mask(segment_ids, COMPLETION)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = token_cross_entropy(model(input_ids)[:, :-1], input_ids[:, 1:], mask) / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.01, "the fixture model did not memorise its sequence"
    return model.eval()


@pytest.fixture(scope="module")
def pcl_model(tok):
    """Writes ROW's gold answer, the marker, a right evaluation and <reward>2</reward>."""
    prompt = prompt_ids(tok, format_prompt("synthetic", ROW))
    evaluation, reward = rewards.render_evaluation(1, 1, WEIGHTS)
    return memorize(tok, evaluation_track(tok, prompt, tok.encode(gold_completion(ROW)), evaluation, reward))


@pytest.fixture(scope="module")
def plain_model(tok):
    """Writes ROW's gold answer and EOS, as a model trained without post-completion."""
    prompt = prompt_ids(tok, format_prompt("synthetic", ROW))
    return memorize(tok, reasoning_track(tok, prompt, gold_completion(ROW), post_completion=False))


def test_pcl_answer_stops_at_marker_and_is_graded(tok, pcl_model):
    record = answer_and_grade(pcl_model, tok, "synthetic", [ROW], WEIGHTS, max_new_tokens=64)[0]
    assert record["completion"] == gold_completion(ROW) + rewards.MARKER
    assert record["tokens"] == len(tok.encode(gold_completion(ROW))) + 1  # the marker counts
    assert record["predicted_reward"] == 2.0
    assert record["reward"] == 2.0
    assert record["correct_probability"] == pytest.approx(1.0, abs=0.05)


def test_baseline_answer_stops_at_eos(tok, plain_model):
    record = answer_and_grade(plain_model, tok, "synthetic", [ROW], WEIGHTS, max_new_tokens=64,
                              post_completion=False)[0]
    assert record["completion"] == gold_completion(ROW)  # the final EOS is not text
    assert record["tokens"] == len(tok.encode(gold_completion(ROW))) + 1  # the EOS counts
    assert record["accuracy"] == 1
    assert record["format"] == 1
    assert record["post_completion"] is None
    assert record["predicted_reward"] is None
    assert record["correct_probability"] is None


def test_tokens_per_answer_same_for_both(tok, pcl_model, plain_model):
    pcl, _ = evaluate(pcl_model, tok, "synthetic", [ROW], WEIGHTS, max_new_tokens=64)
    plain, _ = evaluate(plain_model, tok, "synthetic", [ROW], WEIGHTS, max_new_tokens=64, post_completion=False)
    assert pcl["tokens_per_answer"] == plain["tokens_per_answer"]
    assert plain["reward_prediction_accuracy"] is None
    assert pcl["reward_prediction_accuracy"] == 1.0


def test_baseline_is_not_continued_past_marker(tok, pcl_model):
    # a model that writes the marker, evaluated as a baseline, runs on past it to EOS
    record = answer_and_grade(pcl_model, tok, "synthetic", [ROW], WEIGHTS, max_new_tokens=64,
                              post_completion=False)[0]
    assert rewards.MARKER in record["completion"]
    assert record["predicted_reward"] is None
    assert record["post_completion"] is None


def test_score_distributions_match_full_forward(tok, pcl_model):
    head = ScoreHead(tok, WEIGHTS, "cpu")
    prefixes = [[5, 9, 12, 3], [8, 2]]
    distributions = score_distributions(pcl_model, head, tok.pad_id, prefixes)
    for prefix, distribution in zip(prefixes, distributions):
        with torch.no_grad():
            logits = pcl_model(torch.tensor([prefix]))[0, -1]
        expected = torch.softmax(logits[head.ids], dim=-1)
        torch.testing.assert_close(torch.tensor(distribution), expected, atol=1e-5, rtol=1e-5)


def test_score_distributions_without_head(pcl_model):
    assert score_distributions(pcl_model, None, 0, [[1, 2], [3]]) == [None, None]


def test_expected_accuracy_known_values():
    values = [0.0, 1.0, 2.0]
    # format 1: only the value 2 means a right answer
    assert expected_accuracy([0.1, 0.3, 0.6], values, 1, WEIGHTS) == pytest.approx(0.6)
    # format 0: the value 1 means a right answer; 2 is out of reach and clips to 1
    assert expected_accuracy([0.1, 0.3, 0.6], values, 0, WEIGHTS) == pytest.approx(0.9)
    assert expected_accuracy([0.5, 0.5], [0.0, 1.0], 0, rewards.RewardWeights(accuracy=0.0)) is None


def test_multi_token_reward_values_use_parsed_prediction(tok, pcl_model):
    # 0.5 is several tokens, so there is no score head; the model still writes <reward>2</reward>
    weights = rewards.RewardWeights(accuracy=1.5, format=0.5)
    record = answer_and_grade(pcl_model, tok, "synthetic", [ROW], weights, max_new_tokens=64)[0]
    assert record["predicted_reward"] == 2.0
    assert record["correct_probability"] == 1.0  # (2 - 0.5 * 1) / 1.5


# command line


@pytest.fixture
def run_folder(tmp_path, tok, plain_model):
    """A run directory as train.py writes it: OUT/model and OUT/run_config.json."""
    out = tmp_path / "run"
    save_pretrained(plain_model, tok, out / "model")
    options = {"data": "synthetic", "post_completion": False, "w_acc": 1.0, "w_fmt": 1.0, "seed": 3,
               "max_new_tokens": 40, "max_evaluation_tokens": 12}
    (out / "run_config.json").write_text(json.dumps(options))
    return out


def test_cli_writes_json_and_table(tmp_path, tok, pcl_model, capsys):
    folder = tmp_path / "model"
    save_pretrained(pcl_model, tok, folder)
    out = tmp_path / "metrics.json"
    samples = tmp_path / "samples.jsonl"
    evaluate_module.main(["--checkpoint", str(folder), "--data", "gsm8k", "--data-dir", str(FIXTURES / "gsm8k"),
                          "--limit", "2", "--max-new-tokens", "24", "--max-evaluation-tokens", "12",
                          "--out", str(out), "--samples", str(samples)])
    result = json.loads(out.read_text())
    assert result["data"] == "gsm8k"
    assert result["settings"]["post_completion"] is True
    metrics = result["metrics"]
    assert metrics["eval_examples"] == 2
    for key in ("accuracy", "format_rate", "tokens_per_answer", "reward_prediction_accuracy", "reward_mae",
                "correctness_auroc", "correctness_ece", "prediction_rate"):
        assert key in metrics, key
    assert 1 <= metrics["tokens_per_answer"] <= 24
    assert len(samples.read_text().splitlines()) == 2
    printed = capsys.readouterr().out
    assert "accuracy" in printed
    assert "reward prediction accuracy" in printed


def test_cli_takes_options_of_the_run(run_folder, capsys):
    evaluate_module.main(["--checkpoint", str(run_folder / "model"), "--data", "synthetic", "--limit", "3"])
    result = json.loads((run_folder / "model" / "eval-synthetic.json").read_text())
    assert result["settings"] == {"post_completion": False, "w_acc": 1.0, "w_fmt": 1.0, "seed": 3,
                                  "max_new_tokens": 40, "max_evaluation_tokens": 12}
    assert result["metrics"]["reward_prediction_accuracy"] is None
    assert result["metrics"]["tokens_per_answer"] <= 40
    assert "n/a" in capsys.readouterr().out


def test_cli_flags_override_the_run(run_folder):
    evaluate_module.main(["--checkpoint", str(run_folder / "model"), "--data", "synthetic", "--limit", "2",
                          "--post-completion", "--seed", "0", "--max-new-tokens", "16"])
    settings = json.loads((run_folder / "model" / "eval-synthetic.json").read_text())["settings"]
    assert settings["post_completion"] is True
    assert settings["seed"] == 0
    assert settings["max_new_tokens"] == 16
    assert settings["max_evaluation_tokens"] == 12


def test_cli_run_on_other_dataset_keeps_length_default(run_folder):
    # the run's 40-token limit was sized for synthetic, so gsm8k gets its own default
    evaluate_module.main(["--checkpoint", str(run_folder / "model"), "--data", "gsm8k", "--data-dir",
                          str(FIXTURES / "gsm8k"), "--limit", "1"])
    settings = json.loads((run_folder / "model" / "eval-gsm8k.json").read_text())["settings"]
    assert settings["max_new_tokens"] == 320


@pytest.mark.parametrize("flags, words", [
    (["--checkpoint", "/nonexistent/model", "--data", "synthetic"], ["config.json not found"]),
    (["--data", "gsm8k", "--data-dir", "/nonexistent/gsm8k"], ["--data-dir /nonexistent/gsm8k: directory not found"]),
    (["--data", "gsm8k"], ["--data gsm8k reads local files: pass --data-dir"]),
    (["--data", "synthetic", "--limit", "0"], ["--limit must be at least 1, got 0"]),
    (["--data", "synthetic", "--w-acc", "nan"], ["--w-acc must be a finite number >= 0"]),
    (["--data", "synthetic", "--device", "gpu0"], ["--device gpu0: invalid device"]),
])
def test_cli_rejects_bad_input(run_folder, capsys, flags, words):
    if "--checkpoint" not in flags:
        flags = ["--checkpoint", str(run_folder / "model"), *flags]
    with pytest.raises(SystemExit) as raised:
        evaluate_module.main(flags)
    code = raised.value.code
    message = (code if isinstance(code, str) else "") + capsys.readouterr().err
    assert code not in (0, None)
    for word in words:
        assert word in message

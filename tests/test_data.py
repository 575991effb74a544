"""Tests for the data package: synthetic task, file loaders, errors and prompts.

The real-data checks at the end run only where the datasets exist at REAL_DATA.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from data import DATASETS, PROMPT_TEMPLATES, DataError, Row, format_prompt, load_rows
from data.mathqa import parse_options
from data.strategyqa import split_for_qid
from data import synthetic
from data.synthetic import generate, split_for_question

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Parsers for synthetic text, written independently of data/synthetic.py.
QUESTION_PATTERN = re.compile(
    r"(?P<name>[A-Z][a-z]+) has (?P<start>\d+) (?P<noun>[a-z]+)\. "
    r"(?P<operations>.*) How many (?P<plural>[a-z]+) does (?P=name) have now\?"
)
OPERATION_PATTERN = re.compile(r"(?:She|He) [a-z ]+? (?P<operand>\d+)(?P<more> more)?\.")
STEP_PATTERN = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\.")


# Synthetic task


def test_synthetic_same_seed_same_rows():
    assert generate("train", 300, seed=3) == generate("train", 300, seed=3)


def test_synthetic_seeds_give_different_rows():
    first = [row.question for row in generate("train", 300, seed=0)]
    second = [row.question for row in generate("train", 300, seed=1)]
    assert first != second


def test_synthetic_smaller_n_is_prefix():
    assert generate("test", 50, seed=2) == generate("test", 500, seed=2)[:50]


def test_synthetic_test_questions_not_in_train():
    train = {row.question for row in load_rows("synthetic", "train")}
    for seed in (0, 1, 2):
        test = {row.question for row in generate("test", 2000, seed=seed)}
        assert not test & train, f"seed {seed}: test questions found in train"


def test_synthetic_split_follows_question_hash():
    for split in ("train", "test"):
        for row in generate(split, 1000, seed=0):
            assert split_for_question(row.question) == split, row.source


def test_synthetic_output_pinned():
    # Guards the dataset itself: a change to the generator or the split hash changes
    # every run's data, so it must show up here.
    row = generate("test", 1, seed=0)[0]
    assert row.question == "Eva has 20 apples. She finds 6 more. How many apples does Eva have now?"
    assert row.reasoning == "20 + 6 = 26."
    assert row.answer == "26"


def test_synthetic_questions_unique():
    questions = [row.question for row in generate("train", 5000, seed=0)]
    assert len(set(questions)) == len(questions)


def test_synthetic_step_counts_even():
    rows = generate("train", 300, seed=0)
    counts = Counter(len(STEP_PATTERN.findall(row.reasoning)) for row in rows)
    assert counts == {1: 100, 2: 100, 3: 100}


def test_synthetic_default_sizes():
    assert len(load_rows("synthetic", "train")) == 20000
    assert len(load_rows("synthetic", "test")) == 200


def test_synthetic_limit_sets_size():
    assert len(load_rows("synthetic", "train", limit=37)) == 37


def test_synthetic_source_names_row():
    rows = generate("test", 3, seed=0)
    assert [row.source for row in rows] == ["synthetic:test:0", "synthetic:test:1", "synthetic:test:2"]


@pytest.mark.parametrize("split", ["train", "test"])
def test_synthetic_arithmetic_and_ranges(split):
    """Recompute every step from the question text and check every number's range."""
    for row in generate(split, 3000, seed=5):
        question = QUESTION_PATTERN.fullmatch(row.question)
        assert question is not None, f"{row.source}: unexpected question {row.question!r}"
        operations = OPERATION_PATTERN.findall(question["operations"])
        steps = STEP_PATTERN.findall(row.reasoning)
        step_texts = [f"{a} {op} {b} = {c}." for a, op, b, c in steps]

        assert " ".join(step_texts) == row.reasoning, f"{row.source}: malformed reasoning"
        assert 1 <= len(steps) <= 3, f"{row.source}: {len(steps)} steps"
        assert len(operations) == len(steps), f"{row.source}: steps do not match sentences"
        assert synthetic.START_MIN <= int(question["start"]) <= synthetic.START_MAX, f"{row.source}: start out of range"
        assert question["plural"].startswith(question["noun"].rstrip("s")), row.source

        value = int(question["start"])
        for (operand_text, more), (a, op, b, c) in zip(operations, steps):
            expected_op = "+" if more else "-"
            expected_value = value + int(b) if op == "+" else value - int(b)
            assert int(a) == value, f"{row.source}: step starts from {a}, expected {value}"
            assert op == expected_op, f"{row.source}: sign does not match the sentence"
            assert int(b) == int(operand_text), f"{row.source}: operand differs from question"
            assert synthetic.OPERAND_MIN <= int(b) <= synthetic.OPERAND_MAX, f"{row.source}: operand {b} out of range"
            assert int(c) == expected_value, f"{row.source}: {a} {op} {b} is not {c}"
            assert 0 <= int(c) <= synthetic.VALUE_MAX, f"{row.source}: result {c} out of range"
            value = int(c)
        assert row.answer == str(value), f"{row.source}: answer {row.answer} != {value}"


def test_synthetic_singular_noun_for_one():
    rows = [row for row in generate("train", 5000, seed=0) if " has 1 " in row.question]
    assert rows, "no start quantity of 1 in 5000 rows"
    for row in rows:
        match = QUESTION_PATTERN.fullmatch(row.question)
        assert not match["noun"].endswith("s"), row.question


def test_synthetic_vocabulary_small():
    words = set()
    for row in generate("train", 5000, seed=0):
        words.update(re.findall(r"[A-Za-z]+", row.question))
    assert len(words) < 50, sorted(words)


def test_synthetic_invalid_arguments():
    with pytest.raises(DataError, match="split"):
        generate("valid", 10)
    with pytest.raises(DataError, match="non-negative"):
        generate("train", -1)


# load_rows and format_prompt


def test_load_rows_unknown_dataset():
    with pytest.raises(DataError) as raised:
        load_rows("gsm9k", "train")
    for name in DATASETS:
        assert name in str(raised.value)


def test_load_rows_unknown_split():
    with pytest.raises(DataError, match="'validation'"):
        load_rows("synthetic", "validation")


@pytest.mark.parametrize("limit", [-1, 1.5, True])
def test_load_rows_invalid_limit(limit):
    with pytest.raises(DataError, match="limit"):
        load_rows("synthetic", "train", limit=limit)


@pytest.mark.parametrize("name", ["gsm8k", "strategyqa", "mathqa"])
def test_load_rows_requires_data_dir(name):
    with pytest.raises(DataError, match="--data-dir"):
        load_rows(name, "train")


def test_load_rows_data_dir_not_found(tmp_path):
    with pytest.raises(DataError, match="directory not found"):
        load_rows("gsm8k", "train", data_dir=tmp_path / "absent")


def test_load_rows_limit_keeps_first_rows():
    rows = load_rows("gsm8k", "train", data_dir=FIXTURES / "gsm8k", limit=2)
    assert [row.source.rsplit(":", 1)[1] for row in rows] == ["1", "2"]


def test_load_rows_accepts_str_data_dir():
    rows = load_rows("mathqa", "test", data_dir=str(FIXTURES / "mathqa"))
    assert len(rows) == 2


def test_prompt_templates_cover_datasets():
    assert set(PROMPT_TEMPLATES) == set(DATASETS)


def _fixture_row(name: str) -> Row:
    data_dir = None if name == "synthetic" else FIXTURES / name
    return load_rows(name, "train", data_dir=data_dir, limit=1)[0]


@pytest.mark.parametrize("name", DATASETS)
def test_format_prompt_shape(name):
    row = _fixture_row(name)
    prompt = format_prompt(name, row)
    assert prompt.startswith(row.question)
    assert prompt.endswith("\n")
    assert "<think>" in prompt
    assert "</think>" in prompt
    assert "<answer>" in prompt
    assert "</answer>" in prompt


def test_format_prompt_synthetic_is_short():
    row = _fixture_row("synthetic")
    overhead = len(format_prompt("synthetic", row)) - len(row.question)
    assert overhead <= 60


def test_format_prompt_strategyqa_asks_yes_no():
    assert "yes or no" in format_prompt("strategyqa", _fixture_row("strategyqa"))


def test_format_prompt_mathqa_lists_options():
    row = load_rows("mathqa", "train", data_dir=FIXTURES / "mathqa")[1]
    prompt = format_prompt("mathqa", row)
    assert "a) rs . 1,200\n" in prompt
    assert "e) rs . 15,000\n" in prompt
    assert "letter" in prompt


def test_format_prompt_mathqa_without_options():
    row = Row(question="q", answer="a", reasoning="r", source="made-up:1")
    with pytest.raises(DataError, match="made-up:1"):
        format_prompt("mathqa", row)


def test_format_prompt_unknown_dataset():
    with pytest.raises(DataError, match="gsm8k"):
        format_prompt("gsm", _fixture_row("gsm8k"))


# GSM8K


def test_gsm8k_fixture_train_rows():
    rows = load_rows("gsm8k", "train", data_dir=FIXTURES / "gsm8k")
    path = FIXTURES / "gsm8k" / "train.jsonl"
    assert len(rows) == 3
    assert rows[0] == Row(
        question="Mila has 3 boxes with 4 pens in each box. She gives away 2 pens. "
        "How many pens does she have left?",
        answer="10",
        reasoning="Mila has 3*4 = 12 pens.\nAfter giving 2 away she has 12-2 = 10 pens.",
        source=f"{path}:1",
    )


def test_gsm8k_removes_commas_from_answer():
    row = load_rows("gsm8k", "train", data_dir=FIXTURES / "gsm8k")[1]
    assert row.answer == "1000"
    assert row.reasoning == "It makes 25*40 = $1,000."


def test_gsm8k_keeps_u2028_in_question():
    row = load_rows("gsm8k", "train", data_dir=FIXTURES / "gsm8k")[2]
    assert "\u2028" in row.question
    assert row.answer == "42"


def test_gsm8k_fixture_test_rows():
    rows = load_rows("gsm8k", "test", data_dir=FIXTURES / "gsm8k")
    assert [row.answer for row in rows] == ["35", "42"]


GOOD_GSM8K_LINE = json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2.\n#### 2"})

GSM8K_LINE_ERRORS = [
    # (case, second line of train.jsonl, field named in the error or None)
    ("invalid JSON", '{"question": "q", "answer": ', None),
    ("not an object", "[1, 2]", None),
    ("missing question", json.dumps({"answer": "x\n#### 1"}), "question"),
    ("missing answer", json.dumps({"question": "q"}), "answer"),
    ("answer not a string", json.dumps({"question": "q", "answer": 5}), "answer"),
    ("question not a string", json.dumps({"question": None, "answer": "x\n#### 1"}), "question"),
    ("empty question", json.dumps({"question": "  ", "answer": "x\n#### 1"}), "question"),
    ("no final answer marker", json.dumps({"question": "q", "answer": "x = 1"}), "answer"),
    ("empty final answer", json.dumps({"question": "q", "answer": "x = 1\n####  "}), "answer"),
    ("empty reasoning", json.dumps({"question": "q", "answer": "#### 1"}), "answer"),
]


@pytest.mark.parametrize(
    "line, field", [case[1:] for case in GSM8K_LINE_ERRORS], ids=[case[0] for case in GSM8K_LINE_ERRORS]
)
def test_gsm8k_line_errors(tmp_path, line, field):
    (tmp_path / "train.jsonl").write_text(f"{GOOD_GSM8K_LINE}\n{line}\n", encoding="utf-8")
    with pytest.raises(DataError) as raised:
        load_rows("gsm8k", "train", data_dir=tmp_path)
    message = str(raised.value)
    assert "train.jsonl:2:" in message
    if field is not None:
        assert f"'{field}'" in message


def test_gsm8k_missing_file(tmp_path):
    with pytest.raises(DataError) as raised:
        load_rows("gsm8k", "test", data_dir=tmp_path)
    assert "test.jsonl" in str(raised.value)
    assert "not found" in str(raised.value)


@pytest.mark.parametrize("content", ["", "\n \n"], ids=["no bytes", "blank lines"])
def test_gsm8k_empty_file(tmp_path, content):
    (tmp_path / "train.jsonl").write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as raised:
        load_rows("gsm8k", "train", data_dir=tmp_path)
    assert "train.jsonl" in str(raised.value)
    assert "empty" in str(raised.value)


def test_gsm8k_invalid_utf8(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"question": "\xff"}\n')
    with pytest.raises(DataError) as raised:
        load_rows("gsm8k", "train", data_dir=tmp_path)
    assert "train.jsonl" in str(raised.value)
    assert "UTF-8" in str(raised.value)


def test_gsm8k_line_numbers_count_blank_lines(tmp_path):
    bad_line = json.dumps({"question": "q", "answer": "no marker"})
    (tmp_path / "train.jsonl").write_text(f"{GOOD_GSM8K_LINE}\n\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.jsonl:3:"):
        load_rows("gsm8k", "train", data_dir=tmp_path)


# StrategyQA


def test_strategyqa_splits_partition_records():
    train = load_rows("strategyqa", "train", data_dir=FIXTURES / "strategyqa")
    test = load_rows("strategyqa", "test", data_dir=FIXTURES / "strategyqa")
    assert [row.source.rsplit("[", 1)[1] for row in train] == ["0]", "2]", "3]", "5]"]
    assert [row.source.rsplit("[", 1)[1] for row in test] == ["1]", "4]"]


def test_strategyqa_split_follows_qid_hash():
    records = json.loads((FIXTURES / "strategyqa" / "strategyQA_train.json").read_text())
    assert [split_for_qid(record["qid"]) for record in records] == [
        "train", "test", "train", "train", "test", "train"
    ]


def test_strategyqa_fixture_row():
    row = load_rows("strategyqa", "test", data_dir=FIXTURES / "strategyqa")[0]
    assert row.question == "Do penguins live at the South Pole region?"
    assert row.answer == "yes"
    assert row.reasoning == "Many penguin species live in Antarctica. The South Pole is in Antarctica."
    assert row.options is None


def test_strategyqa_false_row_normalised():
    row = load_rows("strategyqa", "train", data_dir=FIXTURES / "strategyqa")[1]
    assert row.question == "Would a piano fit in a shoe box?"
    assert row.answer == "no"
    assert row.reasoning == "A piano is over one meter wide. A shoe box is about 30 cm long."


def _strategyqa_record(**changes):
    record = {
        "qid": "fixture-99",
        "question": "Is water wet?",
        "answer": True,
        "facts": ["Water makes things wet."],
        "decomposition": ["Does water make things wet?"],
    }
    record.update(changes)
    return {key: value for key, value in record.items() if value is not _DROP}


_DROP = object()

STRATEGYQA_RECORD_ERRORS = [
    # (case, record at index 1, field named in the error or None)
    ("not an object", "just a string", None),
    ("missing qid", _strategyqa_record(qid=_DROP), "qid"),
    ("qid not a string", _strategyqa_record(qid=7), "qid"),
    ("missing question", _strategyqa_record(question=_DROP), "question"),
    ("empty question", _strategyqa_record(question=" "), "question"),
    ("missing answer", _strategyqa_record(answer=_DROP), "answer"),
    ("answer is a string", _strategyqa_record(answer="yes"), "answer"),
    ("answer is a number", _strategyqa_record(answer=1), "answer"),
    ("missing facts", _strategyqa_record(facts=_DROP), "facts"),
    ("facts not a list", _strategyqa_record(facts="Water is wet."), "facts"),
    ("fact not a string", _strategyqa_record(facts=["Water is wet.", 3]), "facts"),
    ("facts empty", _strategyqa_record(facts=[]), "facts"),
]


@pytest.mark.parametrize(
    "record, field",
    [case[1:] for case in STRATEGYQA_RECORD_ERRORS],
    ids=[case[0] for case in STRATEGYQA_RECORD_ERRORS],
)
def test_strategyqa_record_errors(tmp_path, record, field):
    records = [_strategyqa_record(qid="fixture-98"), record]
    (tmp_path / "strategyQA_train.json").write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(DataError) as raised:
        load_rows("strategyqa", "train", data_dir=tmp_path)
    message = str(raised.value)
    assert "strategyQA_train.json[1]" in message
    if field is not None:
        assert f"'{field}'" in message


def test_strategyqa_validates_other_split(tmp_path):
    # fixture-02 is a test record, so loading the train split must still reject it.
    records = [_strategyqa_record(qid="fixture-02", answer="no")]
    (tmp_path / "strategyQA_train.json").write_text(json.dumps(records), encoding="utf-8")
    with pytest.raises(DataError, match=r"strategyQA_train\.json\[0\]"):
        load_rows("strategyqa", "train", data_dir=tmp_path)


JSON_FILE_ERRORS = [
    # (case, file content, words expected in the error)
    ("invalid JSON", '[{"qid": "x",\n  "question": }]', ["invalid JSON", "line 2"]),
    ("top level not a list", '{"qid": "x"}', ["an object", "JSON array"]),
    ("empty list", "[]", ["empty"]),
]


@pytest.mark.parametrize(
    "content, words", [case[1:] for case in JSON_FILE_ERRORS], ids=[case[0] for case in JSON_FILE_ERRORS]
)
@pytest.mark.parametrize(
    "name, filename", [("strategyqa", "strategyQA_train.json"), ("mathqa", "dev.json")]
)
def test_json_file_errors(tmp_path, name, filename, content, words):
    (tmp_path / filename).write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as raised:
        load_rows(name, "train", data_dir=tmp_path)
    message = str(raised.value)
    assert filename in message
    for word in words:
        assert word in message


@pytest.mark.parametrize(
    "name, split, filename",
    [("strategyqa", "test", "strategyQA_train.json"), ("mathqa", "test", "test.json")],
)
def test_json_missing_file(tmp_path, name, split, filename):
    with pytest.raises(DataError) as raised:
        load_rows(name, split, data_dir=tmp_path)
    assert filename in str(raised.value)
    assert "not found" in str(raised.value)


# MathQA


def test_mathqa_fixture_row():
    row = load_rows("mathqa", "train", data_dir=FIXTURES / "mathqa")[0]
    assert row.question == "a pen costs 3 and a book costs 5 . what do 2 pens and 1 book cost ?"
    assert row.answer == "b"
    assert row.reasoning == "2 * 3 + 5 = 11 . answer : b ."
    assert row.options == {"a": "10", "b": "11", "c": "12", "d": "13", "e": "none of these"}


def test_mathqa_dev_is_train_split():
    rows = load_rows("mathqa", "train", data_dir=FIXTURES / "mathqa")
    assert len(rows) == 4
    assert rows[0].source.endswith("dev.json[0]")


def test_mathqa_unquoted_rationale_kept():
    row = load_rows("mathqa", "test", data_dir=FIXTURES / "mathqa")[0]
    assert row.reasoning == "9 * 3 = 27 , so the answer is e"


def test_mathqa_fixture_option_forms():
    rows = load_rows("mathqa", "train", data_dir=FIXTURES / "mathqa")
    assert rows[1].options["a"] == "rs . 1,200"
    assert rows[2].options == {"a": "4 sq . m", "b": "8 sq . m", "c": "6 , 2", "d": "2", "e": "16"}
    assert rows[3].options == {"a": "13", "b": "14", "c": "15", "d": "16", "e": "17"}


PARSE_OPTIONS_CASES = [
    # (case, options, expected)
    ("plain", "a ) 38 , b ) 27.675 , c ) 25 , d ) 35 , e ) none of these",
     {"a": "38", "b": "27.675", "c": "25", "d": "35", "e": "none of these"}),
    ("commas inside values", "a ) rs . 1,200 , b ) 3 , 4 , c ) 5",
     {"a": "rs . 1,200", "b": "3 , 4", "c": "5"}),
    ("tight spacing", "a) 1,b) 2,c)3", {"a": "1", "b": "2", "c": "3"}),
    ("four options", "a ) 1 , b ) 2 , c ) 3 , d ) 4", {"a": "1", "b": "2", "c": "3", "d": "4"}),
    ("repeated labels", "a ) a ) 3 , b ) b ) 4 , c ) d ) 5", {"a": "3", "b": "4", "c": "5"}),
    ("list literal", "['a ) 4 π', 'b ) 5 , 6']", {"a": "4 π", "b": "5 , 6"}),
    ("json list", ["a ) 1", "b ) 2"], {"a": "1", "b": "2"}),
    ("letter inside text", "a ) 2 ( a ) , b ) 3", {"a": "2 ( a )", "b": "3"}),
]


@pytest.mark.parametrize(
    "options, expected",
    [case[1:] for case in PARSE_OPTIONS_CASES],
    ids=[case[0] for case in PARSE_OPTIONS_CASES],
)
def test_parse_options(options, expected):
    assert parse_options(options) == expected


PARSE_OPTIONS_ERRORS = [
    ("no labels", "38 , 27 , 25"),
    ("one option", "a ) 38"),
    ("empty option", "a ) 38 , b )  , c ) 5"),
    ("starts at b", "b ) 1 , c ) 2"),
    ("broken list literal", "['a ) 1', 'b ) 2'"),
    ("list out of order", "['a ) 1', 'c ) 2']"),
    ("list item unlabelled", "['a ) 1', '2']"),
    ("not a string", 5),
]


@pytest.mark.parametrize(
    "options", [case[1] for case in PARSE_OPTIONS_ERRORS], ids=[case[0] for case in PARSE_OPTIONS_ERRORS]
)
def test_parse_options_rejects(options):
    with pytest.raises(ValueError):
        parse_options(options)


def _mathqa_record(**changes):
    record = {
        "Problem": "what is 2 + 2 ?",
        "Rationale": '"2 + 2 = 4 . answer : b"',
        "options": "a ) 3 , b ) 4 , c ) 5 , d ) 6 , e ) 7",
        "correct": "b",
    }
    record.update(changes)
    return {key: value for key, value in record.items() if value is not _DROP}


MATHQA_RECORD_ERRORS = [
    # (case, record at index 1, field named in the error or None)
    ("not an object", 42, None),
    ("missing Problem", _mathqa_record(Problem=_DROP), "Problem"),
    ("empty Problem", _mathqa_record(Problem=""), "Problem"),
    ("missing Rationale", _mathqa_record(Rationale=_DROP), "Rationale"),
    ("Rationale only quotes", _mathqa_record(Rationale='""'), "Rationale"),
    ("missing options", _mathqa_record(options=_DROP), "options"),
    ("options unparsable", _mathqa_record(options="3 , 4 , 5"), "options"),
    ("options a number", _mathqa_record(options=4), "options"),
    ("missing correct", _mathqa_record(correct=_DROP), "correct"),
    ("correct not a letter", _mathqa_record(correct="4"), "correct"),
    ("correct beyond options", _mathqa_record(options="a ) 3 , b ) 4", correct="e"), "correct"),
]


@pytest.mark.parametrize(
    "record, field",
    [case[1:] for case in MATHQA_RECORD_ERRORS],
    ids=[case[0] for case in MATHQA_RECORD_ERRORS],
)
def test_mathqa_record_errors(tmp_path, record, field):
    (tmp_path / "test.json").write_text(json.dumps([_mathqa_record(), record]), encoding="utf-8")
    with pytest.raises(DataError) as raised:
        load_rows("mathqa", "test", data_dir=tmp_path)
    message = str(raised.value)
    assert "test.json[1]" in message
    if field is not None:
        assert f"'{field}'" in message


def test_mathqa_uppercase_correct_accepted(tmp_path):
    (tmp_path / "test.json").write_text(json.dumps([_mathqa_record(correct="B")]), encoding="utf-8")
    assert load_rows("mathqa", "test", data_dir=tmp_path)[0].answer == "b"


# Real datasets: counts and whole-file checks. Each test skips when its folder is absent.


def _real_dir(name: str) -> Path:
    path = REAL_DATA / name
    if not path.is_dir():
        pytest.skip(f"real {name} data not found at {path}; only the fixture tests ran")
    return path


def test_real_gsm8k_counts():
    data_dir = _real_dir("gsm8k")
    assert len(load_rows("gsm8k", "train", data_dir=data_dir)) == 7473
    assert len(load_rows("gsm8k", "test", data_dir=data_dir)) == 1319


def test_real_gsm8k_rows_clean():
    data_dir = _real_dir("gsm8k")
    for split in ("train", "test"):
        for row in load_rows("gsm8k", split, data_dir=data_dir):
            assert re.fullmatch(r"-?\d+", row.answer), f"{row.source}: answer {row.answer!r}"
            assert "<<" not in row.reasoning, f"{row.source}: calculator annotation left"
            assert "####" not in row.reasoning, f"{row.source}: final-answer marker left"


def test_real_strategyqa_split():
    data_dir = _real_dir("strategyqa")
    train = load_rows("strategyqa", "train", data_dir=data_dir)
    test = load_rows("strategyqa", "test", data_dir=data_dir)
    assert len(train) + len(test) == 2290
    assert not {row.source for row in train} & {row.source for row in test}
    assert 0.15 <= len(test) / 2290 <= 0.25, f"test fraction {len(test) / 2290:.3f}"
    assert {row.answer for row in train + test} == {"yes", "no"}


def test_real_mathqa_counts():
    data_dir = _real_dir("mathqa")
    assert len(load_rows("mathqa", "train", data_dir=data_dir)) == 4475
    assert len(load_rows("mathqa", "test", data_dir=data_dir)) == 2985


def test_real_mathqa_options():
    data_dir = _real_dir("mathqa")
    for split in ("train", "test"):
        for row in load_rows("mathqa", split, data_dir=data_dir):
            assert row.answer in row.options, f"{row.source}: {row.answer!r} not in options"
            assert list(row.options) == list("abcde"), f"{row.source}: {row.options}"
            for text in row.options.values():
                assert not re.match(r"[a-e] \)", text), f"{row.source}: label left in {text!r}"


# Skipping invalid rows with on_bad_row


def test_gsm8k_skips_bad_lines(tmp_path):
    bad_json = '{"question": "q", "answer": '
    no_marker = json.dumps({"question": "q", "answer": "x = 1"})
    (tmp_path / "train.jsonl").write_text(
        f"{GOOD_GSM8K_LINE}\n{bad_json}\n{GOOD_GSM8K_LINE}\n{no_marker}\n", encoding="utf-8"
    )
    errors = []
    rows = load_rows("gsm8k", "train", data_dir=tmp_path, on_bad_row=errors.append)
    assert [row.source.rsplit(":", 1)[1] for row in rows] == ["1", "3"]
    assert len(errors) == 2
    assert "train.jsonl:2:" in str(errors[0])
    assert "train.jsonl:4:" in str(errors[1])


def test_mathqa_skips_bad_records(tmp_path):
    records = [_mathqa_record(), _mathqa_record(correct="e", options="a ) 3 , b ) 4"), _mathqa_record()]
    (tmp_path / "test.json").write_text(json.dumps(records), encoding="utf-8")
    errors = []
    rows = load_rows("mathqa", "test", data_dir=tmp_path, on_bad_row=errors.append)
    assert [row.source.rsplit("[", 1)[1] for row in rows] == ["0]", "2]"]
    assert len(errors) == 1
    assert "test.json[1]" in str(errors[0])


def test_strategyqa_skips_bad_records(tmp_path):
    records = json.loads((FIXTURES / "strategyqa" / "strategyQA_train.json").read_text())
    records.insert(1, _strategyqa_record(answer="yes"))
    (tmp_path / "strategyQA_train.json").write_text(json.dumps(records), encoding="utf-8")
    errors = []
    rows = load_rows("strategyqa", "train", data_dir=tmp_path, on_bad_row=errors.append)
    assert len(rows) == 4
    assert len(errors) == 1
    assert "strategyQA_train.json[1]" in str(errors[0])


def test_skipping_every_row_raises(tmp_path):
    (tmp_path / "train.jsonl").write_text("[1]\nnot json\n", encoding="utf-8")
    errors = []
    with pytest.raises(DataError) as raised:
        load_rows("gsm8k", "train", data_dir=tmp_path, on_bad_row=errors.append)
    assert "no rows for split 'train' after skipping 2 invalid rows" in str(raised.value)
    assert len(errors) == 2


def test_file_errors_raise_when_skipping(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_rows("gsm8k", "train", data_dir=tmp_path, on_bad_row=lambda error: None)


# Real rows through the parsers and the reward rules. Each test skips when its folder is absent;
# the fixture versions below them run everywhere.


def test_real_strategyqa_first_record():
    data_dir = _real_dir("strategyqa")
    rows = load_rows("strategyqa", "train", data_dir=data_dir) + load_rows("strategyqa", "test", data_dir=data_dir)
    row = next(r for r in rows if r.source.endswith("strategyQA_train.json[0]"))
    assert row.question == "Are more people today related to Genghis Khan than Julius Caesar?"
    assert row.answer == "yes"
    # the double space inside the third fact is collapsed
    assert row.reasoning == ("Julius Caesar had three children. Genghis Khan had sixteen children. Modern "
                             "geneticists have determined that out of every 200 men today has DNA that can be "
                             "traced to Genghis Khan.")
    assert split_for_qid("b8677742616fef051f00") in ("train", "test")


def test_real_mathqa_first_test_record():
    row = load_rows("mathqa", "test", data_dir=_real_dir("mathqa"))[0]
    assert row.question.startswith("a shopkeeper sold an article offering a discount of 5 %")
    assert row.answer == "a"
    assert row.options == {"a": "38", "b": "27.675", "c": "30", "d": "data inadequate", "e": "none of these"}
    assert row.reasoning.startswith("giving no discount to customer")
    assert row.reasoning.endswith("= 38 % answer a")  # the surrounding quotes are gone


def _check_gold_scores(name: str, rows: list[Row]):
    """Every row's gold completion is well formatted and right, and a wrong answer scores 0."""
    from pcl import rewards
    from pcl.sft import gold_completion

    weights = rewards.RewardWeights()
    for row in rows:
        scores = rewards.score(name, gold_completion(row), row.answer, weights, row.options)
        assert (scores.format, scores.accuracy) == (1, 1), f"{row.source}: {gold_completion(row)[:200]!r}"
        if name == "strategyqa":
            wrong = "no" if row.answer == "yes" else "yes"
            assert rewards.accuracy_reward(name, wrong, row.answer) == 0, row.source
        else:
            # the option's value text counts as the answer too, unless it reads as an option letter
            # ("a ) d" in dev.json[1733]), which the letter rule takes first
            value = row.options[row.answer]
            if not re.fullmatch(r"[a-e]", value.strip(), re.IGNORECASE):
                assert rewards.accuracy_reward(name, value, row.answer, row.options) == 1, f"{row.source}: {value!r}"
            other = next(letter for letter in row.options if letter != row.answer)
            assert rewards.accuracy_reward(name, other, row.answer, row.options) == 0, row.source


@pytest.mark.parametrize("name", ["strategyqa", "mathqa"])
def test_real_rows_score_as_right(name):
    data_dir = _real_dir(name)
    _check_gold_scores(name, load_rows(name, "train", data_dir=data_dir) + load_rows(name, "test", data_dir=data_dir))


@pytest.mark.parametrize("name", ["strategyqa", "mathqa"])
def test_fixture_rows_score_as_right(name):
    rows = load_rows(name, "train", data_dir=FIXTURES / name) + load_rows(name, "test", data_dir=FIXTURES / name)
    _check_gold_scores(name, rows)

import json

import pytest
from conftest import HF_TOKENIZER_STYLES, write_hf_style_tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from data import Row, format_prompt
from model.tokenizer import (EOS_TOKEN, EVALUATION, EVALUATION_END, MARKER, PAD_TOKEN, PCL_TOKENS, REWARD,
                             REWARD_END, Tokenizer, train_tokenizer)
from pcl.sequence import completion_text, evaluation_track, prompt_ids, reasoning_track

PCL_TEXT = (
    "Cara has 305 coins. She loses 17.\n"
    "<think>305 - 17 = 288.</think>\n<answer>288</answer>\n<post-completion>\n"
    "<evaluation>format: 1\naccuracy: 0\ntotal: 1</evaluation>\n<reward>1</reward>"
)


def test_digits_split(tok):
    assert len(tok.encode("1234")) == 4


def test_digits_split_in_text(tok):
    ids = tok.encode("has 1234 apples")
    digits = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digits == ["1", "2", "3", "4"]


def test_same_digit_same_id(tok):
    ids = tok.encode("7777")
    assert len(set(ids)) == 1


def test_round_trip_tags_and_newlines(tok):
    assert tok.decode(tok.encode(PCL_TEXT)) == PCL_TEXT


@pytest.mark.parametrize("text", ["", " leading space", "trailing space ", "a\n\n\nb", "tab\there",
                                  "unseen: zebra quartz émoji ✓"])
def test_round_trip_edge_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("token", PCL_TOKENS)
def test_pcl_tag_single_id(tok, token):
    ids = tok.encode(f"x {token} y")
    assert ids.count(tok.token_id(token)) == 1


def test_pcl_tags_distinct(tok):
    assert len({tok.token_id(t) for t in PCL_TOKENS}) == len(PCL_TOKENS)


def test_marker_id(tok):
    assert tok.marker_id == tok.token_id(MARKER)
    assert tok.encode(MARKER) == [tok.marker_id]


def test_eos_and_pad(tok):
    assert tok.eos_id == tok.token_id(EOS_TOKEN)
    assert tok.pad_id == tok.token_id(PAD_TOKEN)
    assert tok.eos_id != tok.pad_id


def test_eos_text_single_id(tok):
    assert tok.encode(EOS_TOKEN) == [tok.eos_id]


def test_no_bos(tok):
    assert tok.bos_id is None


def test_vocab_size_counts_added_tokens(tok):
    assert tok.vocab_size > max(tok.token_id(t) for t in PCL_TOKENS)


def test_unknown_token_id(tok):
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        tok.token_id("<no-such-token>")


def test_pad_defaults_to_eos():
    tk = HFTokenizer(models.WordLevel({"a": 0, "<|endoftext|>": 1}, unk_token="a"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = Tokenizer(tk, EOS_TOKEN)
    assert tokenizer.pad_id == tokenizer.eos_id


def test_add_pcl_tokens_idempotent():
    tokenizer = train_tokenizer(["a b c 1 2"], vocab_size=280)
    size = tokenizer.vocab_size
    tokenizer.add_pcl_tokens()
    assert tokenizer.vocab_size == size


# ---------------------------------------------------------------------------------------------
# save / from_folder


def test_save_and_load_same_encodings(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.encode(PCL_TEXT) == tok.encode(PCL_TEXT)
    assert loaded.decode(tok.encode(PCL_TEXT)) == PCL_TEXT


def test_save_and_load_same_ids(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.eos_id == tok.eos_id
    assert loaded.pad_id == tok.pad_id
    assert loaded.marker_id == tok.marker_id
    assert loaded.bos_id == tok.bos_id
    assert loaded.vocab_size == tok.vocab_size
    for token in PCL_TOKENS:
        assert loaded.token_id(token) == tok.token_id(token), token


def test_save_writes_config(tok, tmp_path):
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOS_TOKEN
    assert config["pad_token"] == PAD_TOKEN
    assert config["additional_special_tokens"] == PCL_TOKENS


def test_from_folder_without_config_uses_common_eos(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.eos_id == tok.eos_id
    assert loaded.pad_id == tok.eos_id


def test_from_folder_token_dict(tok, tmp_path):
    # HF tokenizer_config.json may store a token as {"content": ...}
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["pad_token"] = {"content": PAD_TOKEN, "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_folder(tmp_path).pad_id == tok.pad_id


def test_from_folder_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json not found"):
        Tokenizer.from_folder(tmp_path)


def test_from_folder_invalid_config_named(tok, tmp_path):
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<|end')
    with pytest.raises(ValueError, match="tokenizer_config.json: invalid JSON"):
        Tokenizer.from_folder(tmp_path)


def test_from_folder_no_eos(tmp_path):
    tk = HFTokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    tk.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="cannot find the end-of-sequence token"):
        Tokenizer.from_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# Tokenizers laid out like those Qwen2, Qwen3 and Llama 3 ship


@pytest.fixture(params=list(HF_TOKENIZER_STYLES))
def hf_style(request, tmp_path):
    """(style, folder) of a tokenizer written by write_hf_style_tokenizer, without the PCL tokens."""
    return request.param, write_hf_style_tokenizer(tmp_path / "base", request.param)


def test_hf_style_special_ids(hf_style):
    style, folder = hf_style
    raw = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    config = HF_TOKENIZER_STYLES[style]["config"]
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.eos_id == raw.token_to_id(config["eos_token"])
    assert tokenizer.pad_id == raw.token_to_id(config.get("pad_token", config["eos_token"]))
    if style == "llama3":
        assert tokenizer.bos_id == raw.token_to_id("<|begin_of_text|>")
    else:
        assert tokenizer.bos_id is None


def test_hf_style_encode_without_bos(hf_style):
    _, folder = hf_style
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.bos_id not in tokenizer.encode("Ann has 12 apples.")


def test_hf_style_round_trip(hf_style):
    _, folder = hf_style
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.decode(tokenizer.encode(PCL_TEXT)) == PCL_TEXT


def test_hf_style_pcl_tokens_appended(hf_style):
    style, folder = hf_style
    raw = HFTokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer = Tokenizer.from_folder(folder)
    already_present = [t for t in PCL_TOKENS if raw.token_to_id(t) is not None]
    new = len(PCL_TOKENS) - len(already_present)
    assert already_present == (["<think>", "</think>"] if style == "qwen3" else [])
    assert tokenizer.vocab_size == raw.get_vocab_size() + new
    assert tokenizer.added_ids == list(range(raw.get_vocab_size(), raw.get_vocab_size() + new))
    for token in already_present:
        assert tokenizer.token_id(token) == raw.token_to_id(token), token
    for token in PCL_TOKENS:
        assert tokenizer.encode(f"x{token}y").count(tokenizer.token_id(token)) == 1, token


def test_hf_style_pcl_tokens_added_once(hf_style, tmp_path):
    _, folder = hf_style
    first = Tokenizer.from_folder(folder)
    first.add_pcl_tokens()
    assert first.vocab_size == len(first.tk.get_vocab(with_added_tokens=True))
    first.save(tmp_path / "saved")
    second = Tokenizer.from_folder(tmp_path / "saved")
    assert second.added_ids == []
    assert second.vocab_size == first.vocab_size
    assert second.max_id == first.max_id
    for token in PCL_TOKENS:
        assert second.token_id(token) == first.token_id(token), token
    assert second.encode(PCL_TEXT) == first.encode(PCL_TEXT)


def test_max_id_is_last_added(hf_style):
    _, folder = hf_style
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.max_id == tokenizer.vocab_size - 1
    assert tokenizer.max_id == max(tokenizer.token_id(t) for t in PCL_TOKENS)


# ---------------------------------------------------------------------------------------------
# The sequence builder encodes its parts separately and concatenates the ids


ROW = Row(question="Ann has 12 apples. She buys 7 more. How many apples does Ann have now?",
          answer="19", reasoning="12 + 7 = 19.", source="test:0")
EVALUATION_TEXT, REWARD_TEXT = "format: 1\naccuracy: 1\ntotal: 2", "2"


def builder_tokenizers(tok, tmp_path):
    yield "trained", tok
    for style in HF_TOKENIZER_STYLES:
        yield style, Tokenizer.from_folder(write_hf_style_tokenizer(tmp_path / style, style))


def test_reasoning_track_equals_joined_text(tok, tmp_path):
    prompt = format_prompt("synthetic", ROW)
    completion = completion_text(ROW.reasoning, ROW.answer)
    for name, tokenizer in builder_tokenizers(tok, tmp_path):
        built = reasoning_track(tokenizer, prompt_ids(tokenizer, prompt), completion).input_ids
        assert built == prompt_ids(tokenizer, prompt + completion + MARKER), name


def test_evaluation_track_equals_joined_text(tok, tmp_path):
    prompt = format_prompt("synthetic", ROW)
    completion = completion_text(ROW.reasoning, ROW.answer)
    for name, tokenizer in builder_tokenizers(tok, tmp_path):
        built = evaluation_track(tokenizer, prompt_ids(tokenizer, prompt), tokenizer.encode(completion),
                                 EVALUATION_TEXT, REWARD_TEXT).input_ids
        joined = (prompt + completion + MARKER + EVALUATION + EVALUATION_TEXT + EVALUATION_END + REWARD
                  + REWARD_TEXT + REWARD_END + tokenizer.eos_token)
        assert built == prompt_ids(tokenizer, joined), name


def test_split_inside_word_differs(tok):
    # a boundary inside plain text is where encoding parts separately changes the ids, which is
    # why the builder only splits next to special tokens
    word = "evaluation"
    assert len(tok.encode(word)) == 1
    pieces = tok.encode(word[:5]) + tok.encode(word[5:])
    assert len(pieces) > 1
    assert tok.decode(pieces) == word


def test_split_before_space_same_ids(tok):
    # the pre-tokenizer already cuts before a space, so this plain-text boundary is harmless
    text = "Ann has 12 apples."
    cut = text.index(" apples")
    assert tok.encode(text[:cut]) + tok.encode(text[cut:]) == tok.encode(text)

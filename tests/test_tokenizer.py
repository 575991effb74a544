import json

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from model.tokenizer import EOS_TOKEN, MARKER, PAD_TOKEN, PCL_TOKENS, Tokenizer, train_tokenizer

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


def test_from_folder_no_eos(tmp_path):
    tk = HFTokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a"))
    tk.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="cannot find the end-of-sequence token"):
        Tokenizer.from_folder(tmp_path)

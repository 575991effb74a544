"""Tokenizer wrapper on `tokenizers.Tokenizer` that adds the PCL special tokens.

Every PCL tag is an added special token with a single id, so generation can stop on the
`<post-completion>` id and the sequence builder can split a sampled completion by ids.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

THINK, THINK_END = "<think>", "</think>"
ANSWER, ANSWER_END = "<answer>", "</answer>"
MARKER = "<post-completion>"
EVALUATION, EVALUATION_END = "<evaluation>", "</evaluation>"
REWARD, REWARD_END = "<reward>", "</reward>"
PCL_TOKENS = [THINK, THINK_END, ANSWER, ANSWER_END, MARKER, EVALUATION, EVALUATION_END, REWARD, REWARD_END]

# Special tokens of the tokenizer trained for the synthetic task. Padding has its own id, so no
# code can confuse padding with a real end of sequence.
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
COMMON_EOS_TOKENS = ["<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "</s>"]


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, eos_token: str, pad_token: str | None = None):
        self.tk = tokenizer
        self.eos_token = eos_token
        self.eos_id = self._require_id(eos_token)
        self.pad_token = pad_token or eos_token
        self.pad_id = self._require_id(self.pad_token)
        # a tokenizer that prepends a BOS token (Llama) shows it when asked to add special tokens
        with_special = tokenizer.encode("a").ids
        without = tokenizer.encode("a", add_special_tokens=False).ids
        self.bos_id = with_special[0] if len(with_special) > len(without) and with_special[0] != without[0] else None
        self.add_pcl_tokens()

    def _require_id(self, token: str) -> int:
        token_id = self.tk.token_to_id(token)
        if token_id is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def add_pcl_tokens(self):
        """Add the PCL tags as special tokens (a no-op for those already present)."""
        missing = [t for t in PCL_TOKENS if self.tk.token_to_id(t) is None]
        self.tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        # ids new to this tokenizer: a loaded model has no trained embedding for them
        self.added_ids = [self.tk.token_to_id(t) for t in missing]
        for token in PCL_TOKENS:
            ids = self.encode(token)
            if len(ids) != 1:
                raise ValueError(f"PCL token {token!r} encodes to {len(ids)} ids, expected one")
        self.marker_id = self.token_id(MARKER)

    def token_id(self, token: str) -> int:
        return self._require_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    @property
    def max_id(self) -> int:
        """Largest token id; the embedding matrix needs max_id + 1 rows even where ids have gaps."""
        return max(self.tk.get_vocab(with_added_tokens=True).values())

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without BOS/EOS; the sequence builder adds those.

        The sequence builder (pcl.sequence) encodes each part of a sequence separately and
        concatenates the ids. That gives the ids of the joined text when every boundary is next to
        a special token (a PCL tag or EOS), because the tokenizer cuts the text at special tokens
        before BPE runs. A boundary inside plain text can change the ids, since BPE then cannot
        merge across it: "evalu" + "ation" encodes to more ids than "evaluation".
        """
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Text of `ids` with the PCL tags kept, so the reward rules can read them."""
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def decode_completion(self, ids) -> str:
        """Text of a generated completion for the reward rules. A final EOS id only ends generation,
        so it is dropped rather than graded as text after the answer."""
        ids = list(ids)
        if ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return self.decode(ids)

    def save(self, folder: str | Path):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tk.save(str(folder / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "additional_special_tokens": PCL_TOKENS,
            "clean_up_tokenization_spaces": False,
        }
        if self.bos_id is not None:
            config["bos_token"] = self.tk.id_to_token(self.bos_id)
        with open(folder / "tokenizer_config.json", "w") as f:
            json.dump(config, f, indent=2)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        """Load tokenizer.json from an HF model folder; EOS and padding come from its
        tokenizer_config.json, else from a list of common EOS tokens."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: tokenizer.json not found in the model folder; copy the model's "
                                    "tokenizer.json into it")
        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception on invalid files
            raise ValueError(f"{path}: invalid tokenizer file ({e})") from e
        config = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except ValueError as e:
                raise ValueError(f"{config_path}: invalid JSON ({e})") from e

        def token_text(value):
            return value.get("content") if isinstance(value, dict) else value

        eos = token_text(config.get("eos_token"))
        if eos is None or tk.token_to_id(eos) is None:
            eos = next((t for t in COMMON_EOS_TOKENS if tk.token_to_id(t) is not None), None)
        if eos is None:
            raise ValueError(f"{folder}: cannot find the end-of-sequence token; set eos_token in tokenizer_config.json")
        pad = token_text(config.get("pad_token"))
        if pad is not None and tk.token_to_id(pad) is None:
            pad = None
        return cls(tk, eos, pad)


def train_tokenizer(texts, vocab_size: int = 384) -> Tokenizer:
    """Train a small byte-level BPE tokenizer on `texts`.

    Every digit is its own token, so numbers are spelled digit by digit and a small model can
    learn arithmetic on them.
    """
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tk, EOS_TOKEN, PAD_TOKEN)

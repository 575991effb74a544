"""Shared pytest setup: the repository root on sys.path, small trained tokenizers, random models."""

import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The test tensors are tiny, so intra-op threads only add synchronisation, and when other processes
# keep the cores busy each small op waits for its threads to be scheduled.
torch.set_num_threads(1)

from model.config import ModelConfig  # noqa: E402  (imports need the path set above)
from model.tokenizer import train_tokenizer  # noqa: E402
from model.transformer import Transformer  # noqa: E402

# Text in the shape of the synthetic task: a question, a completion with tags, an evaluation.
TOKENIZER_TEXTS = [
    "Ann has 12 apples. She buys 7 more and gives away 5. How many apples does Ann have now?",
    "Ben has 40 marbles. He loses 13. How many marbles does Ben have?",
    "<think>12 + 7 = 19. 19 - 5 = 14.</think>\n<answer>14</answer>",
    "<think>40 - 13 = 27.</think>\n<answer>27</answer>",
    "<evaluation>format: 1\naccuracy: 1\ntotal: 2</evaluation>\n<reward>2</reward>",
    "<evaluation>format: 1\naccuracy: 0\ntotal: 1</evaluation>\n<reward>1</reward>",
]


@pytest.fixture(scope="session")
def tok():
    """A byte-level BPE tokenizer trained on TOKENIZER_TEXTS, with the PCL tags added.

    Session-scoped: tests must not add tokens to it.
    """
    return train_tokenizer(TOKENIZER_TEXTS * 4, vocab_size=300)


# Special tokens and tokenizer_config.json entries of the released tokenizers that each style imitates.
HF_TOKENIZER_STYLES = {
    "qwen2": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], plain=[],
                  config={"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
    # Qwen3 ships <think> and </think> as added tokens that are not special
    "qwen3": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], plain=["<think>", "</think>"],
                  config={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], plain=[],
                   config={"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}),
}


def write_hf_style_tokenizer(folder: Path, style: str, vocab_size: int = 300) -> Path:
    """Write tokenizer.json and tokenizer_config.json laid out like the Qwen2, Qwen3 or Llama 3 files.

    Those tokenizers are byte-level BPE behind a regex pre-split, with their special tokens added
    after the merged vocabulary. Qwen normalises to NFC and splits every digit. Llama 3 keeps up to
    three digits together and prepends its BOS token through a template post-processor.
    """
    spec = HF_TOKENIZER_STYLES[style]
    digits = r"\p{N}{1,3}" if style == "llama3" else r"\p{N}"
    split = Regex(rf"'(?i:[sdmt]|ll|ve|re)| ?\p{{L}}+|{digits}| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tk = HFTokenizer(models.BPE())
    if style != "llama3":
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(split, behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(spec["specials"]) - len(spec["plain"]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TOKENIZER_TEXTS * 4, trainer=trainer)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["specials"]])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["plain"]])
    if style == "llama3":
        bos = spec["config"]["bos_token"]
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                          special_tokens=[(bos, tk.token_to_id(bos))])
    else:
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **spec["config"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def random_model(config: ModelConfig, seed: int = 0, std: float = 0.1) -> Transformer:
    """A Transformer in eval mode with seeded random weights, norm weights and biases included.

    init_weights() sets norm weights to 1 and biases to 0, which would hide a missing or misplaced
    norm or bias. A std of 0.1 (not 0.02) keeps logits far enough apart that an error shows at 1e-5.
    """
    model = Transformer(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * std
            if name.endswith("norm.weight"):
                p.copy_(1 + noise)
            else:
                p.copy_(noise)
    return model.eval()


@pytest.fixture
def make_model():
    """random_model(config, seed=0, std=0.1), with config built from the tiny preset and `overrides`."""

    def make(seed: int = 0, std: float = 0.1, vocab_size: int = 64, **overrides) -> Transformer:
        config = ModelConfig.from_preset("tiny", vocab_size=vocab_size, **overrides)
        return random_model(config, seed=seed, std=std)

    return make

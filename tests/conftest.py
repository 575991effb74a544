"""Shared pytest setup: the repository root on sys.path and a small trained tokenizer."""

import sys
from pathlib import Path

import pytest
import torch

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

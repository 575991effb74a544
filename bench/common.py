"""Pieces shared by the benches that compare our model with a transformers peer."""

import argparse

import torch


def add_model_arguments(p: argparse.ArgumentParser, family: str, vocab: int, hidden: int, intermediate: int,
                        layers: int, heads: int, kv_heads: int = 2) -> argparse._ArgumentGroup:
    """Add the "model" group of flags that shape the random model, with these defaults; return it."""
    group = p.add_argument_group("model")
    group.add_argument("--family", choices=["llama", "qwen2", "qwen3"], default=family,
                       help="transformers model_type of the random model")
    group.add_argument("--vocab", type=int, default=vocab, help="vocabulary size V")
    group.add_argument("--hidden", type=int, default=hidden, help="model width D")
    group.add_argument("--intermediate", type=int, default=intermediate, help="MLP width")
    group.add_argument("--layers", type=int, default=layers, help="number of transformer blocks")
    group.add_argument("--heads", type=int, default=heads, help="query heads H")
    group.add_argument("--kv-heads", type=int, default=kv_heads, help="key/value heads")
    group.add_argument("--tied", action=argparse.BooleanOptionalAction, default=True,
                       help="tie the output layer to the input embedding")
    return group


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Return left-padded ids (B, P) and their attention mask (B, P), as transformers' generate takes them."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    return ids, mask

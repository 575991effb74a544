"""Speed of our Transformer against transformers' eager implementation, with the same weights.

    OMP_NUM_THREADS=1 python bench/model_speed.py [--family qwen2 --hidden 384 --layers 6 ...]

transformers builds a random model of the chosen family and saves it, and our load_pretrained
reads it back, so both sides run the same weights in the same process. Two measurements:

- training: forward plus backward of a next-token cross-entropy over a (batch, time) batch;
- generation: batched greedy decoding of left-padded prompts of different lengths, our KV-cache
  sampler against transformers' generate with its default cache, both with eager attention.

Each prints tokens/s of both sides and the ratio ours / transformers (above 1: ours is faster).
The last line is a JSON summary. Absolute speeds on a shared machine are noise; the ratios are
the result. transformers is needed here as in the tests; product code never imports it.
"""

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import add_model_arguments, left_pad  # noqa: E402
from model.checkpoint import load_pretrained  # noqa: E402
from model.generate import generate  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_peer(args):
    """Build a transformers model of args.family with seeded random weights, in eval mode."""
    config = transformers.AutoConfig.for_model(
        args.family, vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        tie_word_embeddings=args.tied, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                # transformers' std of 0.02 leaves logits so close that rounding could flip greedy choices
                p.normal_(0.0, 0.05)
    return model.eval()


def training_step(model, ids, logits_of):
    """Run one forward and backward of the mean next-token cross-entropy, then drop the gradients."""
    logits = logits_of(model, ids)  # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p, "qwen2", vocab=8192, hidden=384, intermediate=1024, layers=6, heads=6)
    run_group = p.add_argument_group("workload")
    run_group.add_argument("--batch", type=int, default=4, help="training rows B")
    run_group.add_argument("--time", type=int, default=256, help="training positions per row T")
    run_group.add_argument("--prompts", type=int, default=8, help="generation batch: number of prompts")
    run_group.add_argument("--min-prompt", type=int, default=16, help="minimum prompt length, in tokens")
    run_group.add_argument("--max-prompt", type=int, default=64, help="maximum prompt length, in tokens")
    run_group.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per prompt")
    run_group.add_argument("--repeats", type=int, default=3, help="timed repetitions per side (after one warm-up)")
    run_group.add_argument("--seed", type=int, default=0, help="seed of the weights and the token ids")
    args = p.parse_args()
    transformers.utils.logging.disable_progress_bar()

    # ---- the same weights on both sides
    peer = build_peer(args)
    with tempfile.TemporaryDirectory() as folder:
        peer.save_pretrained(folder)
        ours = load_pretrained(folder).eval()
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.time), generator=generator)  # (B, T)
    with torch.no_grad():
        logit_difference = (ours(ids[:1]) - peer(ids[:1]).logits).abs().max().item()

    # ---- training: forward + backward
    train_tokens = args.batch * args.time
    ours.train()
    peer.train()
    ours_train_s = median_seconds(lambda: training_step(ours, ids, lambda m, x: m(x)), args.repeats)
    peer_train_s = median_seconds(lambda: training_step(peer, ids, lambda m, x: m(x).logits), args.repeats)
    ours.eval()
    peer.eval()

    # ---- generation: batched greedy decoding with a KV cache
    lengths = torch.linspace(args.min_prompt, args.max_prompt, args.prompts).long().tolist()
    prompts = [torch.randint(1, args.vocab, (n,), generator=generator).tolist() for n in lengths]
    prompt_ids, mask = left_pad(prompts)
    settings = transformers.GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens,
                                             min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None)

    def generate_ours():
        return generate(ours, prompts, args.new_tokens, stop_ids=[], pad_id=0, temperature=0.0)

    def generate_peer():
        with torch.no_grad():
            return peer.generate(input_ids=prompt_ids, attention_mask=mask, generation_config=settings)

    same_tokens = generate_ours().tokens == generate_peer()[:, prompt_ids.shape[1]:].tolist()
    generated_tokens = args.prompts * args.new_tokens
    ours_generate_s = median_seconds(generate_ours, args.repeats)
    peer_generate_s = median_seconds(generate_peer, args.repeats)

    # ---- report
    train_ratio = peer_train_s / ours_train_s
    generate_ratio = peer_generate_s / ours_generate_s
    print(f"{args.family}: D={args.hidden} layers={args.layers} H={args.heads} kv={args.kv_heads} V={args.vocab}, "
          f"{ours.config.num_parameters() / 1e6:.1f}M parameters, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print(f"max abs logit difference {logit_difference:.2e}; greedy generations identical: {same_tokens}")
    print(f"training   B={args.batch} T={args.time}: ours {train_tokens / ours_train_s:,.0f} tok/s, "
          f"transformers eager {train_tokens / peer_train_s:,.0f} tok/s, ratio {train_ratio:.2f}")
    print(f"generation {args.prompts} prompts of {args.min_prompt}-{args.max_prompt} ids, {args.new_tokens} new: "
          f"ours {generated_tokens / ours_generate_s:,.0f} tok/s, "
          f"transformers eager {generated_tokens / peer_generate_s:,.0f} tok/s, ratio {generate_ratio:.2f}")
    print(json.dumps({
        "bench": "model_speed", "family": args.family, "hidden": args.hidden, "layers": args.layers,
        "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab, "threads": torch.get_num_threads(),
        "train_batch": args.batch, "train_time": args.time, "prompts": args.prompts, "new_tokens": args.new_tokens,
        "ours_train_tokens_per_s": train_tokens / ours_train_s,
        "peer_train_tokens_per_s": train_tokens / peer_train_s,
        "train_speed_ratio": train_ratio,
        "ours_generate_tokens_per_s": generated_tokens / ours_generate_s,
        "peer_generate_tokens_per_s": generated_tokens / peer_generate_s,
        "generate_speed_ratio": generate_ratio,
        "max_abs_logit_difference": logit_difference, "same_greedy_tokens": same_tokens,
    }))


if __name__ == "__main__":
    main()

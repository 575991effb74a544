"""Speed of GRPO-style sampling: our generate against transformers' generate, same weights.

    python bench/generate_speed.py [--prompts 16 --group 8 --new-tokens 128 --repeats 3 ...]

Each of --prompts prompts gets --group samples of exactly --new-tokens tokens at temperature 1,
with no top-k or top-p, as GRPO rollouts are drawn. Ours prefills each prompt once and shares its
KV cache among the group's rows. transformers' generate, with its default dynamic cache and
num_return_sequences, repeats each prompt G times before the prefill. No stop id is set on either
side, so both produce the same number of tokens; a trained model whose rows stop early gives our
side a further advantage that this benchmark does not measure.

The default model has the shape of the default training run's "small" preset (Llama family,
width 128, 4 layers, vocabulary 2048); use --hidden, --layers and the other model flags for
larger shapes. transformers builds the model with seeded random weights and saves it, and our
load_pretrained reads it back. Both sides run in this process, interleaved, after one untimed
warm-up call each. With --compile (the default) a third side runs our generate with its compiled
decode step, which train.py uses with --compile-decode; its warm-up call includes the
compilation (seconds with inductor's on-disk cache warm, about half a minute without it) and is
reported. The last line is a JSON summary; the ratios are ours / transformers in tokens/s, of the
median call of each side and (best_*) of the fastest.
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
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import add_model_arguments, left_pad  # noqa: E402
from model.checkpoint import load_pretrained  # noqa: E402
from model.generate import generate  # noqa: E402


def build_peer(args):
    """Build a transformers model of args.family with seeded random weights, in eval mode."""
    config = transformers.AutoConfig.for_model(
        args.family, vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        tie_word_embeddings=args.tied, bos_token_id=None, eos_token_id=None, max_position_embeddings=2048,
    )
    torch.manual_seed(args.seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=args.attention).eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model_group = add_model_arguments(p, "llama", vocab=2048, hidden=128, intermediate=384, layers=4, heads=4)
    model_group.add_argument("--attention", choices=["eager", "sdpa"], default="sdpa",
                             help="transformers' attention implementation")
    run_group = p.add_argument_group("workload")
    run_group.add_argument("--prompts", type=int, default=16, help="prompts N")
    run_group.add_argument("--group", type=int, default=8, help="samples per prompt G")
    run_group.add_argument("--min-prompt", type=int, default=24, help="minimum prompt length, in tokens")
    run_group.add_argument("--max-prompt", type=int, default=48, help="maximum prompt length, in tokens")
    run_group.add_argument("--new-tokens", type=int, default=128, help="tokens sampled per row")
    run_group.add_argument("--repeats", type=int, default=3, help="timed calls per side, after one warm-up call")
    run_group.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and sampling")
    run_group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                           help="also time our generate with its compiled decode step (generate(compile=True))")
    args = p.parse_args()
    transformers.utils.logging.disable_progress_bar()

    # ---- the same weights on both sides
    peer = build_peer(args)
    with tempfile.TemporaryDirectory() as folder:
        peer.save_pretrained(folder)
        ours = load_pretrained(folder).eval()
    generator = torch.Generator().manual_seed(args.seed)
    lengths = torch.linspace(args.min_prompt, args.max_prompt, args.prompts).long().tolist()
    prompts = [torch.randint(1, args.vocab, (n,), generator=generator).tolist() for n in lengths]
    prompt_ids, mask = left_pad(prompts)
    settings = transformers.GenerationConfig(
        do_sample=True, temperature=1.0, top_k=None, top_p=None, num_return_sequences=args.group,
        max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None)

    def generate_ours(compile):
        out = generate(ours, prompts, args.new_tokens, stop_ids=[], pad_id=0, num_samples=args.group,
                       temperature=1.0, generator=generator, compile=compile)
        assert all(len(t) == args.new_tokens for t in out.tokens)

    def generate_peer():
        with torch.no_grad():
            out = peer.generate(input_ids=prompt_ids, attention_mask=mask, generation_config=settings)
        assert out.shape == (args.prompts * args.group, prompt_ids.shape[1] + args.new_tokens)

    sides = {"ours": lambda: generate_ours(False), "peer": generate_peer}
    if args.compile:
        sides["ours_compiled"] = lambda: generate_ours(True)

    # ---- interleaved timing, after one warm-up call per side (the compiled side compiles in it)
    warm_up = {}
    for name, fn in sides.items():
        start = time.perf_counter()
        fn()
        warm_up[name] = time.perf_counter() - start
    times = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens = args.prompts * args.group * args.new_tokens
    rate = {name: tokens / statistics.median(values) for name, values in times.items()}
    best = {name: tokens / min(values) for name, values in times.items()}  # the fastest call of each side

    # ---- report
    print(f"{args.family}: D={args.hidden} layers={args.layers} H={args.heads} kv={args.kv_heads} V={args.vocab}, "
          f"{ours.config.num_parameters() / 1e6:.2f}M parameters, fp32, torch {torch.__version__}, "
          f"transformers {transformers.__version__} ({args.attention} attention), {torch.get_num_threads()} threads, "
          f"{platform.machine()}")
    print(f"{args.prompts} prompts of {args.min_prompt}-{args.max_prompt} ids x G={args.group}, {args.new_tokens} new "
          f"tokens: transformers generate {rate['peer']:,.0f} tok/s; ours {rate['ours']:,.0f} tok/s, ratio "
          f"{rate['ours'] / rate['peer']:.2f}")
    if args.compile:
        print(f"ours with the compiled decode step: {rate['ours_compiled']:,.0f} tok/s, ratio "
              f"{rate['ours_compiled'] / rate['peer']:.2f} (warm-up call with compilation: "
              f"{warm_up['ours_compiled']:.1f} s)")
    print("fastest call of each side: " + ", ".join(f"{name} {value:,.0f} tok/s" for name, value in best.items()))
    summary = {
        "bench": "generate_speed", "family": args.family, "hidden": args.hidden, "layers": args.layers,
        "vocab": args.vocab, "prompts": args.prompts, "group": args.group, "new_tokens": args.new_tokens,
        "peer_attention": args.attention, "threads": torch.get_num_threads(),
        "repeats": args.repeats, "ours_tokens_per_s": rate["ours"], "peer_tokens_per_s": rate["peer"],
        "speed_ratio": rate["ours"] / rate["peer"], "best_speed_ratio": best["ours"] / best["peer"],
    }
    if args.compile:
        summary.update(compiled_tokens_per_s=rate["ours_compiled"],
                       compiled_speed_ratio=rate["ours_compiled"] / rate["peer"],
                       best_compiled_speed_ratio=best["ours_compiled"] / best["peer"],
                       compiled_warm_up_s=warm_up["ours_compiled"])
    print(json.dumps(summary))

if __name__ == "__main__":
    main()

"""Speed of a full training step of our Transformer against transformers' eager model, with MFU.

    python bench/train_speed.py [--hidden 512 --layers 8 --time 512 --batch 4 --repeats 3 ...]

A step is what train.py does per optimizer update: forward, the mean next-token cross-entropy,
backward, gradient clipping and AdamW. Ours computes the loss with pcl.losses.token_cross_entropy,
which chunks logits of 2^22 elements or more (the default 4 x 512 x 8192 among them); transformers
computes it inside the model from `labels`. transformers builds a random model and saves it, and
our load_pretrained reads it back, so both sides have the same weights.
Both run in this process on the same batch, one step at a time and interleaved, after one
untimed warm-up step each. Each side has its own AdamW, so both take the same steps from the same start.
With --compile-layers (the default) a third side, a copy of our model, runs its decoder layers
through torch.compile, as train.py does with --compile-layers. Its warm-up step includes the
compilation and is reported.

Model FLOPs utilisation (MFU) divides the model FLOPs of a step by the time and by this machine's
fp32 matrix-multiply peak, measured in the same run as the best of several --peak-size square
torch.mm calls, before and after the steps. Model FLOPs per token are 6 * N + 12 * L * D * T
(N: parameters in matrix multiplies, the output layer included and the input embedding not; the
second term is attention's q.k and p.v products at full T x T, as nanoGPT and the PaLM paper
count them). The last line is a JSON summary. The ratios are ours / transformers in tokens/s.
"""

import argparse
import copy
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
from bench.common import add_model_arguments  # noqa: E402
from model.checkpoint import load_pretrained  # noqa: E402
from pcl.losses import token_cross_entropy  # noqa: E402


def matmul_peak_flops(size: int, repeats: int = 5) -> float:
    """Measure the best fp32 FLOP/s of a (size x size) @ (size x size) torch.mm over `repeats` calls."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def model_flops_per_token(model, T: int) -> float:
    config = model.config
    embedding = model.model.embed_tokens.weight.numel()
    matmul_parameters = sum(p.numel() for p in model.parameters() if p.dim() == 2) - embedding
    matmul_parameters += model.lm_head.weight.numel() if config.tie_word_embeddings else 0
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * T
    return 6 * matmul_parameters + attention


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p, "qwen2", vocab=8192, hidden=512, intermediate=1408, layers=8, heads=8)
    run_group = p.add_argument_group("workload")
    run_group.add_argument("--batch", type=int, default=4, help="rows B")
    run_group.add_argument("--time", type=int, default=512, help="positions per row T")
    run_group.add_argument("--repeats", type=int, default=3, help="timed steps per side, after one warm-up step")
    run_group.add_argument("--peak-size", type=int, default=2048, help="side of the square matmul that measures the peak")
    run_group.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                           help="torch.compile the per-chunk arithmetic of our cross-entropy")
    run_group.add_argument("--compile-layers", action=argparse.BooleanOptionalAction, default=True,
                           help="also time our model with its decoder layers compiled (train.py --compile-layers)")
    run_group.add_argument("--seed", type=int, default=0, help="seed of the weights and the token ids")
    args = p.parse_args()
    transformers.utils.logging.disable_progress_bar()

    # ---- the same weights on both sides
    config = transformers.AutoConfig.for_model(
        args.family, vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        tie_word_embeddings=args.tied, bos_token_id=None, eos_token_id=None, max_position_embeddings=4096,
    )
    torch.manual_seed(args.seed)
    peer = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    with tempfile.TemporaryDirectory() as folder:
        peer.save_pretrained(folder)
        ours = load_pretrained(folder).train()
    generator = torch.Generator().manual_seed(args.seed)
    B, T = args.batch, args.time
    ids = torch.randint(0, args.vocab, (B, T), generator=generator)  # (B, T)
    mask = torch.ones(B, T - 1, dtype=torch.bool)  # every next-token target counts

    def step_fn(model, loss_of):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss = loss_of(model)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            return loss.item()
        return step

    def ours_loss(model):
        return token_cross_entropy(model(ids)[:, :-1], ids[:, 1:], mask, compile=args.compile) / mask.sum()

    def peer_loss(model):
        return model(input_ids=ids, labels=ids).loss

    sides = {"ours": step_fn(ours, ours_loss), "peer": step_fn(peer, peer_loss)}
    if args.compile_layers:
        compiled = copy.deepcopy(ours)
        compiled.compile_layers = True
        sides["ours_compiled"] = step_fn(compiled, ours_loss)

    # ---- interleaved timing, with the matmul peak measured before and after
    peak = matmul_peak_flops(args.peak_size)
    first_losses, warm_up = {}, {}
    for name, step in sides.items():
        start = time.perf_counter()
        first_losses[name] = step()
        warm_up[name] = time.perf_counter() - start
    times = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, step in sides.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    peak = max(peak, matmul_peak_flops(args.peak_size))

    tokens = B * T
    seconds = {name: statistics.median(values) for name, values in times.items()}
    rate = {name: tokens / s for name, s in seconds.items()}
    flops_per_step = model_flops_per_token(ours, T) * tokens
    mfu = {name: flops_per_step / s / peak for name, s in seconds.items()}

    # ---- report
    print(f"{args.family}: D={args.hidden} layers={args.layers} H={args.heads} kv={args.kv_heads} V={args.vocab}, "
          f"{ours.config.num_parameters() / 1e6:.1f}M parameters, fp32, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print(f"first-step loss: ours {first_losses['ours']:.6f}, transformers {first_losses['peer']:.6f}")
    print(f"fp32 matmul peak ({args.peak_size}^3 torch.mm, best of 5, before and after): {peak / 1e9:.1f} GFLOP/s; "
          f"model {flops_per_step / 1e9:.1f} GFLOP per step")
    print(f"training step B={B} T={T} (forward, backward, clip, AdamW): ours {rate['ours']:,.0f} tok/s "
          f"(MFU {100 * mfu['ours']:.0f}%), transformers eager {rate['peer']:,.0f} tok/s (MFU {100 * mfu['peer']:.0f}%), "
          f"ratio {rate['ours'] / rate['peer']:.2f}")
    summary = {
        "bench": "train_speed", "family": args.family, "hidden": args.hidden, "layers": args.layers,
        "heads": args.heads, "kv_heads": args.kv_heads, "vocab": args.vocab, "batch": B, "time": T,
        "threads": torch.get_num_threads(), "repeats": args.repeats, "compile": args.compile,
        "ours_tokens_per_s": rate["ours"], "peer_tokens_per_s": rate["peer"], "speed_ratio": rate["ours"] / rate["peer"],
        "matmul_peak_flops": peak, "model_flops_per_step": flops_per_step, "ours_mfu": mfu["ours"], "peer_mfu": mfu["peer"],
        "first_loss_ours": first_losses["ours"], "first_loss_peer": first_losses["peer"],
    }
    if args.compile_layers:
        print(f"ours with compiled layers: {rate['ours_compiled']:,.0f} tok/s (MFU {100 * mfu['ours_compiled']:.0f}%), "
              f"ratio {rate['ours_compiled'] / rate['peer']:.2f} (warm-up step with compilation: "
              f"{warm_up['ours_compiled']:.1f} s; first-step loss {first_losses['ours_compiled']:.6f})")
        summary.update({
            "compiled_tokens_per_s": rate["ours_compiled"], "compiled_speed_ratio": rate["ours_compiled"] / rate["peer"],
            "compiled_mfu": mfu["ours_compiled"], "compiled_warm_up_s": warm_up["ours_compiled"],
            "first_loss_compiled": first_losses["ours_compiled"],
        })
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

"""Speed of the fused score-regression loss against its eager reference, forward plus backward.

    python bench/loss_speed.py [--vocab 151936 --time 1024 --batch 4 --repeats 5 --no-compile]

Both sides run in the same process on the same logits; the last line is a JSON summary with the
median seconds of each side and their ratio. Absolute times on a shared machine are noise, the
ratio is the result.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pcl.losses import score_regression_fused, score_regression_reference  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (151936 is Qwen2's)")
    p.add_argument("--time", type=int, default=1024, help="positions per row T")
    p.add_argument("--batch", type=int, default=4, help="rows B")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per side (after one warm-up)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the fused side")
    args = p.parse_args()

    torch.manual_seed(0)
    B, T, V = args.batch, args.time, args.vocab
    logits = torch.randn(B, T, V, requires_grad=True)  # (B, T, V)
    score_mask = torch.zeros(B, T, dtype=torch.bool)
    score_mask[torch.arange(B), torch.randint(T // 2, T, (B,))] = True  # one score position per row
    candidate_ids = torch.tensor([15, 16, 17])
    candidate_values = torch.tensor([0.0, 1.0, 2.0])
    targets = torch.randint(0, 3, (B,)).float()

    def run(fn, **kwargs):
        def step():
            loss = fn(logits, score_mask, candidate_ids, candidate_values, targets, **kwargs)
            loss.backward()
            logits.grad = None
        return step

    fused = run(score_regression_fused, compile=args.compile)
    reference = run(score_regression_reference)
    fused()  # warm-up: compilation happens here
    reference()
    fused_s = median_seconds(fused, args.repeats)
    reference_s = median_seconds(reference, args.repeats)
    print(f"B={B} T={T} V={V}: fused {fused_s * 1e3:.1f} ms, eager reference {reference_s * 1e3:.1f} ms, "
          f"speed-up {reference_s / fused_s:.1f}x")
    print(json.dumps({"bench": "loss_speed", "B": B, "T": T, "V": V, "compile": args.compile,
                      "fused_seconds": fused_s, "reference_seconds": reference_s,
                      "speedup": reference_s / fused_s}))


if __name__ == "__main__":
    main()

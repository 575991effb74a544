"""Speed and peak memory of our fast losses against their plain versions, forward plus backward.

    python bench/loss_speed.py [--vocab 151936 --time 1024 --batch 4 --repeats 3 --no-compile]

Two comparisons, both on the same fp32 logits (B, T, V) that require a gradient:

- score regression: score_regression_fused against score_regression_reference, which builds the
  full (B, T, V) softmax;
- token cross-entropy of the SFT tracks: token_cross_entropy (chunked) against plain
  F.cross_entropy over the flattened (B * T, V) logits, with ignore_index on the masked positions.

Both sides of a comparison run in this process, one call at a time and interleaved, after one
untimed warm-up calls each (compilation happens there). Times are medians.

Peak memory is the largest resident set size (RSS) of the process during one call, minus its RSS
just before the call. Before each measured call the kernel's peak counter is reset by writing 5
to /proc/self/clear_refs, and the peak is read from VmHWM in /proc/self/status (Linux only).
RSS counts every page that torch's CPU allocator touched, the gradient of the logits included;
tracemalloc would not see torch's allocations at all. Large tensors are mmap'ed by glibc and
returned to the system when freed, so one call does not inherit the peak of the one before.

The last line is a JSON summary. Absolute times on a shared machine are noise; the ratios are
the result (above 1: ours is faster or smaller).
"""

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pcl.losses import score_regression_fused, score_regression_reference, token_cross_entropy  # noqa: E402


def read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(step, memory: bool) -> tuple[float, float | None]:
    """Run step() once and return its wall time in seconds and its peak RSS above the start in bytes.

    The peak is None when memory is False or the kernel does not allow resetting it."""
    gc.collect()
    can_reset = memory and reset_peak_rss()
    start_rss = read_status_kib("VmRSS") if can_reset else 0
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = (read_status_kib("VmHWM") - start_rss) * 1024 if can_reset else None
    return seconds, peak


def compare(ours, plain, repeats: int) -> dict:
    """Interleave the timed calls of both sides; return median seconds and the largest peak of each."""
    for _ in range(2):  # warm-up: compilation, and the first touch of the allocator's pages
        ours()
        plain()
    times = {"ours": [], "plain": []}
    peaks = {"ours": [], "plain": []}
    for _ in range(repeats):
        for name, step in (("ours", ours), ("plain", plain)):
            seconds, peak = measure(step, memory=True)
            times[name].append(seconds)
            if peak is not None:
                peaks[name].append(peak)
    result = {f"{name}_seconds": statistics.median(times[name]) for name in times}
    for name in peaks:
        result[f"{name}_peak_bytes"] = max(peaks[name]) if peaks[name] else None
    result["speedup"] = result["plain_seconds"] / result["ours_seconds"]
    if peaks["ours"] and peaks["plain"]:
        result["memory_ratio"] = result["ours_peak_bytes"] / result["plain_peak_bytes"]
    return result


def backward_step(loss_fn, logits):
    """Return a step that runs loss_fn() forward, backward into logits.grad, then frees the gradient."""
    def step():
        loss_fn().backward()
        logits.grad = None
    return step


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size V (151936 is Qwen2's)")
    p.add_argument("--time", type=int, default=1024, help="positions per row T")
    p.add_argument("--batch", type=int, default=4, help="rows B")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side, after two warm-up calls")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the per-chunk arithmetic of our side")
    args = p.parse_args()

    torch.manual_seed(0)
    B, T, V = args.batch, args.time, args.vocab
    logits = torch.randn(B, T, V, requires_grad=True)  # (B, T, V) fp32

    # ---- score regression: one score position per row
    score_mask = torch.zeros(B, T, dtype=torch.bool)
    score_mask[torch.arange(B), torch.randint(T // 2, T, (B,))] = True
    candidate_ids = torch.tensor([15, 16, 17])
    candidate_values = torch.tensor([0.0, 1.0, 2.0])
    rewards = torch.randint(0, 3, (B,)).float()

    def score(fn, **kwargs):
        return lambda: fn(logits, score_mask, candidate_ids, candidate_values, rewards, **kwargs)

    with torch.no_grad():
        score_difference = (score(score_regression_fused, compile=args.compile)()
                            - score(score_regression_reference)()).abs().item()
    score_result = compare(backward_step(score(score_regression_fused, compile=args.compile), logits),
                           backward_step(score(score_regression_reference), logits), args.repeats)

    # ---- token cross-entropy: the first quarter of each row is prompt, rows end in padding of
    # different lengths, as in an SFT batch
    targets = torch.randint(0, V, (B, T))
    position = torch.arange(T)[None, :]
    ends = T - torch.arange(B)[:, None] * (T // (4 * B))
    token_mask = (position >= T // 4) & (position < ends)  # (B, T)
    ignored = torch.where(token_mask, targets, torch.full_like(targets, -100))

    def ours_cross_entropy():
        return token_cross_entropy(logits, targets, token_mask, compile=args.compile)

    def plain_cross_entropy():
        return F.cross_entropy(logits.view(B * T, V), ignored.view(B * T), ignore_index=-100, reduction="sum")

    with torch.no_grad():
        ce_difference = (ours_cross_entropy() - plain_cross_entropy()).abs().item()
    ce_result = compare(backward_step(ours_cross_entropy, logits), backward_step(plain_cross_entropy, logits),
                        args.repeats)

    # ---- report
    print(f"B={B} T={T} V={V} fp32, logits {logits.numel() * 4 / 2**30:.2f} GiB, compile={args.compile}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    for label, result, difference in (("score regression: fused vs eager reference", score_result, score_difference),
                                      ("token cross-entropy: chunked vs F.cross_entropy", ce_result, ce_difference)):
        line = (f"{label}: {result['ours_seconds'] * 1e3:.0f} ms vs {result['plain_seconds'] * 1e3:.0f} ms, "
                f"speed-up {result['speedup']:.2f}x")
        if "memory_ratio" in result:
            line += (f"; peak RSS {result['ours_peak_bytes'] / 2**30:.2f} GiB vs "
                     f"{result['plain_peak_bytes'] / 2**30:.2f} GiB, ratio {result['memory_ratio']:.2f}")
        print(line + f"; loss difference {difference:.2e}")
    print(json.dumps({"bench": "loss_speed", "B": B, "T": T, "V": V, "compile": args.compile,
                      "threads": torch.get_num_threads(), "repeats": args.repeats,
                      "score_regression": {**score_result, "loss_difference": score_difference},
                      "token_cross_entropy": {**ce_result, "loss_difference": ce_difference}}))


if __name__ == "__main__":
    main()

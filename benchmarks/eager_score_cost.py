"""The cost of Hugging Face's eager attention per score, in matmul FLOPs: the plan's constant.

Hugging Face's eager attention (what ``circuitfind.load_model``'s models run: their config says
``_attn_implementation == "eager"``) turns each ``[B, H, T, T]`` block of scores into a
pattern with a few memory-bound elementwise passes (scale, add the causal mask, softmax in
float32, cast back; Gemma-2 also soft-caps: divide, tanh, multiply). On a long prompt these
passes, not the FLOPs, are much of a plain forward's time. This script times them on one
layer's scores of ``--heads`` heads and ``--seq-len`` tokens, times a matmul of a
model-sized projection, and prints the passes' time per score in matmul FLOPs
(:data:`circuitfind.patching.plan.EAGER_SCORE_FLOPS`). One torch thread, main-thread CPU
time, medians of ``--rounds`` interleaved rounds. Measures and prints; asserts nothing.

Usage::

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/eager_score_cost.py \
        [--dtype float32] [--heads 14] [--seq-len 2048] [--softcap]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--heads", type=int, default=14)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--softcap", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dt = getattr(torch, args.dtype)
    t, h = args.seq_len, args.heads
    scores = torch.randn(1, h, t, t, dtype=dt)
    mask = torch.triu(torch.full((t, t), torch.finfo(dt).min, dtype=dt), 1)[None, None]
    x = torch.randn(t, 896, dtype=dt)
    w = torch.randn(4864, 896, dtype=dt)

    def eager() -> None:
        s = scores * 0.125
        if args.softcap:
            s = torch.tanh(s / 50.0) * 50.0
        s = s + mask
        torch.softmax(s, -1, dtype=torch.float32).to(dt)

    def matmul() -> None:
        x @ w.T

    eager(), matmul()
    te, tm = [], []
    for _ in range(args.rounds):
        t0 = time.thread_time()
        eager()
        te.append(time.thread_time() - t0)
        t0 = time.thread_time()
        matmul()
        tm.append(time.thread_time() - t0)
    per_score = statistics.median(te) / (h * t * t)
    flops_per_s = 2 * t * 896 * 4864 / statistics.median(tm)
    print(json.dumps({"dtype": args.dtype, "heads": h, "seq_len": t, "softcap": args.softcap,
                      "ns_per_score": round(per_score * 1e9, 2),
                      "matmul_gflops": round(flops_per_s / 1e9, 1),
                      "flops_per_score": round(per_score * flops_per_s, 1)}))


if __name__ == "__main__":
    main()

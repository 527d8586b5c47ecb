"""One layer's attention, two ways of sharing a key/value head among its query heads.

    python benchmarks/attention.py            # SmolLM2-135M's heads: 9 query heads, 3 kv heads of 64
    python benchmarks/attention.py --threads 2 --heads 32 --kv-heads 8 --head-dim 64

enable_gqa: torch's F.scaled_dot_product_attention(..., enable_gqa=True), each query head apart.
grouped: the query heads of a kv head stacked as more query rows of it, as
llama_models.model.ScaledDotProductAttention does (the mask repeated for each head of a group).
Shapes: a decode step (S = 1) at a few cache lengths and batch sizes, and prompts (S = kv_len).
Each figure is the median of 7 rounds of 20 calls, the two alternated.
"""

import argparse
import datetime
import os
import statistics
import time

import torch
import torch.nn.functional as F

import machine  # beside this script

CASES = [(1, 100, 1), (1, 500, 1), (4, 150, 1), (8, 150, 1), (1, 40, 40), (1, 300, 300), (1, 1000, 1000)]


def enable_gqa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def grouped(q, k, v, mask):
    bsz, n_heads, seqlen, head_dim = q.shape
    group = n_heads // k.shape[1]
    mask = None if mask is None else mask.repeat(1, 1, group, 1)
    out = F.scaled_dot_product_attention(q.reshape(bsz, k.shape[1], group * seqlen, head_dim), k, v, attn_mask=mask)
    return out.reshape(bsz, n_heads, seqlen, head_dim)


def microseconds(f, calls: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    opts = parser.parse_args()
    torch.set_num_threads(opts.threads)
    print(f"{machine.describe()}; torch {torch.__version__}; {opts.threads} thread(s); "
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}; load average {os.getloadavg()[0]:.2f}\n")
    print("| dtype | batch | kv_len | S | enable_gqa us | grouped us | grouped / enable_gqa |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for dtype in (torch.bfloat16, torch.float32):
        for bsz, kv_len, seqlen in CASES:
            q = torch.randn(bsz, opts.heads, seqlen, opts.head_dim, dtype=dtype)
            k, v = (torch.randn(bsz, opts.kv_heads, kv_len, opts.head_dim, dtype=dtype) for _ in range(2))
            positions = kv_len - seqlen + torch.arange(seqlen)  # the last seqlen positions, causal
            # A decode step of one row needs no mask; a prompt, or rows at different positions, do.
            mask = (torch.arange(kv_len) <= positions[:, None])[None, None] if seqlen > 1 or bsz > 1 else None
            times = {f: [] for f in (enable_gqa, grouped)}
            for _ in range(7):
                for f in times:
                    times[f].append(microseconds(lambda: f(q, k, v, mask)))
            a, b = (statistics.median(t) for t in times.values())
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {bsz} | {kv_len} | {seqlen} | {a:.0f} | {b:.0f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()

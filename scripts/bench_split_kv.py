"""Sweep the split-KV decode attention kernel's knobs (fastdecode.split_kv_decode_attention) on the GPU.

    python scripts/bench_split_kv.py --lengths 32768 131072 --budget 30

One layer of Llama-3.1-8B shape (32 query / 8 KV heads, head dim 128, bf16, batch 1), the valid prefix the whole
length: per config (keys per block ``bn``, keys per split, num_warps, num_stages) the time of 8 calls replayed as a
CUDA graph, as read bandwidth (K + V bytes / time). Prints as it goes (stops once ``--budget`` seconds have gone)
and the best config per length.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from scbench.engines import fastdecode


def timed(fn, reps=8):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(3):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1000 / 3 / reps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--budget", type=float, default=30)
    ap.add_argument("--bn", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--splits", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--out")
    a = ap.parse_args()
    t0 = time.perf_counter()
    configs = [dict(bn=None, split=None, launch=None)]  # the current default (fastdecode.SPLIT_KV) first
    configs += [dict(bn=bn, split=sp, launch={"num_warps": w, "num_stages": st})
                for bn, sp, w, st in itertools.product(a.bn, a.splits, a.warps, a.stages)]
    out = {}
    for n in a.lengths:
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, n + 256, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        at = torch.tensor([n - 1], device="cuda")
        want = fastdecode.split_kv_decode_attention(q, k, v, at)
        rows = []
        for cfg in configs:
            if time.perf_counter() - t0 > a.budget:
                break
            if cfg["split"] is not None and cfg["split"] * 256 < n:  # at most 256 splits per head
                continue
            got = fastdecode.split_kv_decode_attention(q, k, v, at, **cfg)
            err = (got.float() - want.float()).abs().max().item()
            t = timed(lambda: fastdecode.split_kv_decode_attention(q, k, v, at, **cfg))
            rows.append({**cfg, "us": t * 1e6, "TBps": 2 * 8 * n * 128 * 2 / t / 1e12, "max_err": err})
            print(f"{n} {cfg}: {t * 1e6:.1f} us {rows[-1]['TBps']:.2f} TB/s err {err:.2e}", flush=True)
        if rows:
            best = min(rows, key=lambda r: r["us"])
            print(f"{n} best: {best}", flush=True)
        out[n] = rows
        del k, v
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

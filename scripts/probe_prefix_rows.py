"""CacheBlend's recomputed tokens over the blended cache (row i attends to keys 0..last[i]) on one layer of
Llama-3.1-8B's attention shape: the masked row blocks (``dense.prefix_rows_attention``: memory-efficient SDPA with a
boolean mask over each block's keys) against the split (``dense.prefix_rows_split``: flash over the keys every row of
a block sees, the staircase after them in float32, merged by log-sum-exp), 15% of the tokens as CacheBlend picks
them (random here), bf16, milliseconds per layer and the largest difference between the two.

    python3 -P scripts/probe_prefix_rows.py --tokens 32768 131072 --out results/perf/prefix_rows_h200.json
    python3 -P scripts/probe_prefix_rows.py --device cpu --tokens 4096 --dtype float32   # the mechanism on a CPU
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from scbench.kernels import dense


def timed(fn, reps: int, cuda: bool) -> tuple[float, torch.Tensor]:
    out = fn()
    t = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        t.append(time.perf_counter() - t0)
    return sorted(t)[len(t) // 2] * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--ratio", type=float, default=0.15, help="CacheBlend's recompute_ratio")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    a = ap.parse_args()
    dev, dt, cuda = torch.device(a.device), getattr(torch, a.dtype), a.device == "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    part = None if cuda else dense.attention_lse  # flash's log-sum-exp is a CUDA op; the reference part elsewhere
    rows = []
    for n in a.tokens:
        r = int(a.ratio * n)
        last = torch.cat([torch.randperm(n - 1, generator=g, device=dev)[:r].sort().values,
                          torch.tensor([n - 1], device=dev)])
        q = torch.randn(1, 32, len(last), 128, generator=g, device=dev, dtype=dt)
        k, v = (torch.randn(1, 8, n, 128, generator=g, device=dev, dtype=dt) for _ in range(2))
        scale = 128 ** -0.5
        ms_masked, o_masked = timed(lambda: dense.prefix_rows_attention(q, k, v, last, scale), a.reps, cuda)
        ms_split, o_split = timed(lambda: dense.prefix_rows_split(q, k, v, last, scale, part=part), a.reps, cuda)
        row = {"tokens": n, "rows": len(last), "dtype": a.dtype, "masked_ms": round(ms_masked, 2),
               "split_ms": round(ms_split, 2), "speedup": round(ms_masked / ms_split, 2),
               "max_abs_diff": float((o_masked.float() - o_split.float()).abs().max())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| tokens | recomputed rows | dtype | masked row blocks ms | split ms | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['tokens']} | {x['rows']} | {x['dtype']} | {x['masked_ms']:.2f} | {x['split_ms']:.2f} | "
              f"{x['speedup']:.2f}x | {x['max_abs_diff']:.1e} |")
    if a.out:
        name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
        with open(a.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "reps": a.reps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""Batched decode over a ragged context layer on the GPU (scbench/kernels/ragged_shared.py) against the sequential
path's ragged kernel (scbench/kernels/ragged_decode.py, one request at a time).

    python scripts/bench_ragged_shared.py [--lengths 32768 131072] [--batches 1 2 4 8] [--budget 40] [--out F.json]

One layer of Llama-3.1-8B's shape (32 query / 8 KV heads, head dim 128, bf16), per context length n two caches:
AdaKV-like (4,096 tokens per head on average, spread +-50 %) and DuoAttention-like (half the heads hold the whole
context, half 4,096). A batch of B requests, each with 256 own keys (150 valid): the batched kernel (one launch pair
for the batch) vs B calls of the single-request kernel over the same prefix plus that request's own keys (what each
request of the sequential path reads per step). Each timed as 8 calls captured in a CUDA graph, replayed 3 times.
Bytes: the prefix keys + values (read once per batch step by the batched kernel, B times sequentially). Also the max
|diff| of the batched kernel against the torch path (float32 products) per case. Prints one line per measurement and
a JSON line at the end (and --out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shared_prefix import timed  # noqa: E402

HQ, HKV, D = 32, 8, 128


def caches(n: int, gen) -> dict[str, list[int]]:
    ada = (torch.rand(HKV, generator=gen) + 0.5) * min(4096, n)
    ada = [max(1, int(x)) for x in ada * (HKV * min(4096, n) / ada.sum())]
    return {"adakv": ada, "duo": [n if h % 2 == 0 else min(4096, n) for h in range(HKV)]}


def main() -> None:
    from scbench.kernels import ragged_decode as rd
    from scbench.kernels import ragged_shared as rs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[131072, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--own", type=int, default=256)
    ap.add_argument("--budget", type=float, default=40.0, help="seconds: no new measurement after this")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev, bf = torch.device("cuda"), torch.bfloat16
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    gen = torch.Generator().manual_seed(0)
    t0, rows = time.perf_counter(), []
    for n in a.lengths:
        for kind, lengths in caches(n, gen).items():
            total = sum(lengths)
            pk, pv = (torch.randn(total, D, device=dev, dtype=bf) for _ in range(2))
            off = torch.tensor(rs.offsets_of(lengths), device=dev)
            lens = torch.tensor(lengths, device=dev)
            nbytes = 2 * pk.numel() * pk.element_size()
            suf = torch.empty(1, HKV, 0, D, device=dev, dtype=bf)
            # sequential: one request, its own keys as the ragged kernel's suffix buffer
            q1 = torch.randn(1, HQ, 1, D, device=dev, dtype=bf)
            k1, v1 = (torch.randn(1, HKV, a.own, D, device=dev, dtype=bf) for _ in range(2))
            at1 = torch.tensor([149], device=dev)
            work1 = rd.WorkList(lengths, a.own, dev)
            one = timed(lambda: rd.ragged_decode_triton(q1, pk, pv, off, lens, work1, k1, v1, at1))
            print(f"n={n} {kind} ({total / HKV:.0f} tokens per head on average, {nbytes / 2**20:.0f} MiB): one "
                  f"request {one * 1e6:.1f} us ({nbytes / one / 1e12:.2f} TB/s)", flush=True)
            for b in a.batches:
                if time.perf_counter() - t0 > a.budget:
                    print("budget reached", flush=True)
                    break
                q = torch.randn(b, HQ, 1, D, device=dev, dtype=bf)
                ok, ov = (torch.randn(b, HKV, a.own, D, device=dev, dtype=bf) for _ in range(2))
                sl, oat = torch.zeros(b, dtype=torch.long, device=dev), torch.full((b,), 149, device=dev)
                work = rs.SharedWork(lengths, 0, rs.tiling(b, HQ // HKV)[2], dev)
                fn = lambda: rs.ragged_shared_decode(q, pk, pv, off, lens, suf, suf, sl, ok, ov, oat, work)  # noqa: E731
                bat = timed(fn)
                err = (fn().float() - rs.ragged_shared_attention(q, pk, pv, lengths, suf, suf, sl, ok, ov, oat)
                       .float()).abs().max().item()
                row = {"n": n, "cache": kind, "batch": b, "tokens": total, "batched_us": bat * 1e6,
                       "one_request_us": one * 1e6, "sequential_us": b * one * 1e6, "speedup": b * one / bat,
                       "batched_tbps": nbytes / bat / 1e12, "work_items": work.n, "max_abs_diff": err}
                rows.append(row)
                print(f"n={n} {kind} B={b}: batched {bat * 1e6:.1f} us ({row['batched_tbps']:.2f} TB/s), sequential "
                      f"{b * one * 1e6:.1f} us: {row['speedup']:.2f}x; {work.n} work items; max |diff| vs torch "
                      f"{err:.1e}", flush=True)
            del pk, pv
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    print(json.dumps(out))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

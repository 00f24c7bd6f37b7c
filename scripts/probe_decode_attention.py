"""Decode attention over a KV buffer on a GPU: the fast path's kernels against SDPA on the exact keys.

    python scripts/probe_decode_attention.py [--lengths 8192 32768 131072] [--out F]

Llama-3.1-8B attention shape (32 query / 8 KV heads, head_dim 128, bf16, batch 1), one query. Per length: the
buffer holds ``length + 256`` slots of which ``length`` are valid. Rows: ``triton`` (split-KV kernel, reads only
the valid keys), ``torch`` (masked bmm over the whole buffer), ``sdpa`` (SDPA, flash backend, on the exact keys: not
capturable, the yardstick). Each is timed as a CUDA graph of 20 calls (median of 5 replays); ``GB/s``: KV bytes
of the valid keys / time; ``max_err``: largest difference from the float64 reference.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from scbench.engines import attention, fastdecode


def graph_time(fn, calls: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    ms = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(b) / calls)
    return statistics.median(ms) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for n in args.lengths:
        cap = n + 256
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, cap, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        at = torch.tensor([n - 1], device="cuda")
        masked = torch.arange(cap, device="cuda") >= n
        ks, vs = k[:, :, :n].contiguous(), v[:, :, :n].contiguous()
        want = attention.reference_causal_attention(q, ks, vs)
        fns = {
            "triton": lambda: fastdecode.split_kv_decode_attention(q, k, v, at),
            "torch": lambda: fastdecode.masked_decode_attention(q, k, v, masked),
            "sdpa": lambda: attention.causal_attention(q, ks, vs),
        }
        for name, fn in fns.items():
            try:
                err = (fn().float() - want.float()).abs().max().item()
                t = graph_time(fn)
                row = {"kernel": name, "tokens": n, "us": t * 1e6, "GBps": 2 * ks.numel() * 2 / t / 1e9, "max_err": err}
            except Exception as e:  # noqa: BLE001 - report and go on
                row = {"kernel": name, "tokens": n, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

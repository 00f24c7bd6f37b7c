"""A short chunk's sparse prefill over a long cache: the first turn's query fed after its context with the query
hidden from compression (``policy.query_visible=false``), or a later turn under ``sparse_prefill=every``. On a GPU,
chunks under ``MIN_FLEX_QUERIES`` rows take ``pattern.chunked_attention``; this times its per-head form
(``fast=False``: SDPA's masked ``enable_gqa``) against the fast one (CUDA's default: the dense rows as one causal
call, GQA heads grouped onto their KV head) and dense causal attention (a later turn's prompt over its context: on
CUDA split-KV flash, ``dense.split_kv_lower_right``, and the one-call form), per layer, on random tensors of
Llama-3.1-8B's attention shape (bf16 on CUDA), for each sparse method's own pattern.

    python3 -P scripts/probe_query_chunk.py [--tk 131072] [--tq 50 100] [--out results/perf/query_chunk_h200.json]
    python3 -P scripts/probe_query_chunk.py --device cpu --tk 8192 32768 --tq 50 --reps 2 \
        --out results/perf/query_chunk_cpu.json       # the mechanism on a CPU (float32 and bf16)
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from scbench.kernels import dense
from scbench.kernels import pattern as pat
from scbench.registry import METHODS


def timed(fn, reps: int) -> tuple[float, torch.Tensor]:
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out = fn()
    sync()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        sync()
        t.append(time.perf_counter() - t0)
    return sorted(t)[len(t) // 2] * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tk", type=int, nargs="+", default=[131072], help="keys before the chunk")
    ap.add_argument("--tq", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--methods", nargs="+", default=["trishape", "vertical_slash", "ashape"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", nargs="+", default=None, help="default: bfloat16 on CUDA, float32 and bfloat16 on CPU")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtypes = a.dtypes or (["bfloat16"] if dev.type == "cuda" else ["float32", "bfloat16"])
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for dt_name, base, tq in ((d, b, t) for d in dtypes for b in a.tk for t in a.tq):
        dt, tk = getattr(torch, dt_name), base + tq
        q = torch.randn(1, 32, tq, 128, device=dev, dtype=dt, generator=g)
        k, v = (torch.randn(1, 8, tk, 128, device=dev, dtype=dt, generator=g) for _ in range(2))
        scale = 128 ** -0.5
        ms_dense, ref = timed(lambda: dense.causal_attention(q, k, v, scale), a.reps)  # CUDA: split-KV flash
        split, dense.SPLIT_KV_ROWS = dense.SPLIT_KV_ROWS, 0
        ms_one, one = timed(lambda: dense.causal_attention(q, k, v, scale), a.reps)  # one call (before the split)
        dense.SPLIT_KV_ROWS = split
        for name in a.methods:
            m = METHODS.get(name)()
            p = m.pattern(3, q, k, scale)
            ms_old, o_old = timed(lambda: pat.chunked_attention(q, k, v, p, scale, fast=False), a.reps)
            ms_new, o_new = timed(lambda: pat.chunked_attention(q, k, v, p, scale, fast=True), a.reps)
            ms_hook, _ = timed(lambda: m.prefill_attention(3, q, k, v, scale), a.reps)
            row = dict(method=name, dtype=dt_name, tq=tq, tk=tk, dense_ms=ms_dense, dense_one_call_ms=ms_one,
                       dense_split_diff=float((ref.float() - one.float()).abs().max()), per_head_ms=ms_old,
                       fast_ms=ms_new, hook_ms=ms_hook,
                       max_abs_diff=float((o_old.float() - o_new.float()).abs().max()),
                       density=p.computed_cells() / (pat.causal_cells(tq, tk) * p.heads))
            rows.append(row)
            print(json.dumps({k_: round(x, 4) if isinstance(x, float) else x for k_, x in row.items()}), flush=True)
    print("\n| method | dtype | rows | keys | dense ms (CUDA: split-KV) | dense one call ms | per-head chunked ms | "
          "fast ms | hook ms (default) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['dtype']} | {r['tq']} | {r['tk']} | {r['dense_ms']:.2f} | "
              f"{r['dense_one_call_ms']:.2f} | {r['per_head_ms']:.2f} | "
              f"{r['fast_ms']:.2f} | {r['hook_ms']:.2f} | {r['max_abs_diff']:.1e} |")
    if a.out:
        name = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        with open(a.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "reps": a.reps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

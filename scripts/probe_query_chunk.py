"""A short chunk's sparse prefill over a long cache (GPU): the first turn's query fed after its context with the query
hidden from compression (``policy.query_visible=false``), or a later turn under ``sparse_prefill=every``. Chunks
under ``MIN_FLEX_QUERIES`` rows take ``pattern.chunked_attention``; this times its per-head form (``grouped=False``,
SDPA's ``enable_gqa``) against the grouped one (CUDA's default) and dense causal attention, per layer, on random
bf16 tensors of Llama-3.1-8B's attention shape, for each sparse method's own pattern.

    python3 -P scripts/probe_query_chunk.py [--tk 131072] [--tq 50 100] [--out results/perf/query_chunk_h200.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from scbench.kernels import dense
from scbench.kernels import pattern as pat
from scbench.registry import METHODS


def timed(fn, reps: int = 5) -> tuple[float, torch.Tensor]:
    out = fn()
    torch.cuda.synchronize()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        t.append(time.perf_counter() - t0)
    return sorted(t)[len(t) // 2] * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tk", type=int, default=131072, help="keys before the chunk")
    ap.add_argument("--tq", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--methods", nargs="+", default=["trishape", "vertical_slash", "ashape"])
    ap.add_argument("--out")
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for tq in a.tq:
        tk = a.tk + tq
        q = torch.randn(1, 32, tq, 128, device=dev, dtype=dt, generator=g)
        k, v = (torch.randn(1, 8, tk, 128, device=dev, dtype=dt, generator=g) for _ in range(2))
        scale = 128 ** -0.5
        ms_dense, ref = timed(lambda: dense.causal_attention(q, k, v, scale))
        for name in a.methods:
            m = METHODS.get(name)()
            p = m.pattern(3, q, k, scale)
            ms_old, o_old = timed(lambda: pat.chunked_attention(q, k, v, p, scale, grouped=False))
            ms_new, o_new = timed(lambda: pat.chunked_attention(q, k, v, p, scale, grouped=True))
            ms_hook, _ = timed(lambda: m.prefill_attention(3, q, k, v, scale))
            row = dict(method=name, tq=tq, tk=tk, dense_ms=ms_dense, per_head_ms=ms_old, grouped_ms=ms_new,
                       hook_ms=ms_hook, max_abs_diff=float((o_old.float() - o_new.float()).abs().max()),
                       density=p.computed_cells() / (pat.causal_cells(tq, tk) * p.heads))
            rows.append(row)
            print(json.dumps({k_: round(x, 4) if isinstance(x, float) else x for k_, x in row.items()}), flush=True)
    print("\n| method | rows | keys | dense SDPA ms | per-head chunked ms | grouped ms | hook ms (default) | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['tq']} | {r['tk']} | {r['dense_ms']:.2f} | {r['per_head_ms']:.2f} | "
              f"{r['grouped_ms']:.2f} | {r['hook_ms']:.2f} | {r['max_abs_diff']:.1e} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

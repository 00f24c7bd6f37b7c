"""CPU: exact top-k (torch) vs faiss IVF / HNSW inner-product search for RetrievalAttention, with recall.

One KV head of ``--n`` keys x ``--dim`` (float32, host memory) and ``--rep`` query heads per step (GQA group),
top ``--k`` keys per query head; keys either i.i.d. Gaussian (no structure: the hard case for an ANN index) or a
mixture of Gaussian clusters. Times: index build once; per step, the exact search (``top_keys``), the raw faiss
search and the method's full path (``AnnIndex.search``: faiss + exact re-ranking into the top-k). Recall: share
of the exact top-k set found. Writes JSON (default results/perf/retrieval_index_cpu.json).

    python scripts/bench_retrieval_index.py --n 32768 --dim 64 --k 4096 256 --threads 1
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from scbench.methods.retrieval_attention import AnnIndex, RetrievalAttention, top_keys, topk_recall


def keys_of(kind: str, n: int, d: int, g: torch.Generator) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn(n, d, generator=g)
    centers = torch.randn(256, d, generator=g) * 2
    return centers[torch.randint(0, 256, (n,), generator=g)] + torch.randn(n, d, generator=g)


def timed(fn, reps: int):
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    return out, (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32768)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rep", type=int, default=4)
    ap.add_argument("--k", type=int, nargs="+", default=[4096, 256])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/perf/retrieval_index_cpu.json")
    a = ap.parse_args()
    import faiss

    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for kind in ("gaussian", "clustered"):
        keys = keys_of(kind, a.n, a.dim, g).view(1, 1, a.n, a.dim)
        qs = [keys_of(kind, a.rep, a.dim, g).view(1, a.rep, a.dim) for _ in range(a.steps)]
        for k in a.k:
            exact = [top_keys(q, keys, k) for q in qs]
            _, t_exact = timed(lambda: [top_keys(q, keys, k) for q in qs], 2)
            settings = [dict(index="faiss_ivf", nprobe=p) for p in (8, 32, 128, 256)] + \
                       [dict(index="faiss_hnsw", ef_search=e) for e in (k, 2 * k)]
            for s in settings:
                m = RetrievalAttention(top_k=k, n_init=0, n_local=1, **s)
                t0 = time.perf_counter()
                ann = AnnIndex(m, keys, 0, a.n)
                build = time.perf_counter() - t0
                got, t_full = timed(lambda: [ann.search(q, keys, a.n, k, False) for q in qs], 2)
                _, t_raw = timed(lambda: [ann.parts[0].search(q[0].numpy(), k) for q in qs], 2)
                recall = sum(topk_recall(x, y, a.n) for x, y in zip(got, exact)) / len(qs)
                row = dict(keys=kind, k=k, **s, nlist=getattr(ann.parts[0], "nlist", None), build_s=round(build, 3),
                           index_bytes=ann.nbytes(), key_bytes=a.n * a.dim * 4,
                           exact_step_ms=round(1e3 * t_exact / a.steps, 2),
                           faiss_step_ms=round(1e3 * t_raw / a.steps, 2),
                           method_step_ms=round(1e3 * t_full / a.steps, 2), recall=round(recall, 4))
                print(row, flush=True)
                rows.append(row)
    meta = dict(n=a.n, dim=a.dim, rep=a.rep, steps=a.steps, threads=a.threads, faiss=faiss.__version__,
                torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                note="per step = one KV head's search for its rep query heads; exact = torch matmul + topk")
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

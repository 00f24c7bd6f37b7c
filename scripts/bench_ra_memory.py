"""Why RetrievalAttention's host half is slower inside the decode step than in its microbenchmark, on the GPU box:
the C host kernel (scbench/kernels/ra_host.c) over 8B-shaped layers (8 KV heads x 128 dims, 32 query heads,
top-k 4,096, bf16) held in host memory allocated several ways, each cycling over ``--layers`` distinct layers as a
decode step does (the micro in bench_ra_host.py reuses one layer's buffers, which the caches may partly hold):
pageable (``torch.empty``), pinned (``pin_memory=True``: how ``scbench.kv.offload.Rows`` allocates a host tier on a
CUDA machine), pageable with ``madvise(MADV_HUGEPAGE)``, and pinned after ``cudaHostRegister`` of a pageable
buffer (``torch.cuda.cudart().cudaHostRegister``). Prints ms per layer call, one JSON object per line.

    python scripts/bench_ra_memory.py [--n 131072] [--layers 8] [--reps 3]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import statistics
import time

import torch


def hugepage(t: torch.Tensor) -> torch.Tensor:
    """madvise(MADV_HUGEPAGE) over t's pages (transparent huge pages in madvise mode), then first touch."""
    libc = ctypes.CDLL(None)
    page = mmap.PAGESIZE
    start = t.data_ptr() // page * page
    length = t.data_ptr() + t.numel() * t.element_size() - start
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), 14)  # MADV_HUGEPAGE
    return t


def make(kind: str, src: torch.Tensor) -> torch.Tensor:
    """A copy of ``src`` in host memory of this ``kind``."""
    shape = src.shape
    if kind == "pageable":
        return src.clone()
    if kind == "pinned":
        return src.pin_memory()
    if kind == "hugepage":
        t = hugepage(torch.empty(shape, dtype=torch.bfloat16))
        t.copy_(src)
        return t
    if kind in ("registered", "hugepage_registered"):
        t = torch.empty(shape, dtype=torch.bfloat16)
        if kind == "hugepage_registered":
            hugepage(t)
        t.copy_(src)
        rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        if int(rc) != 0:
            raise RuntimeError(f"cudaHostRegister: {rc}")
        return t
    raise ValueError(kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kinds", nargs="+",
                    default=["pageable", "pinned", "hugepage", "registered", "hugepage_registered"])
    ap.add_argument("--tunes", nargs="*", default=[], help="more scan prefetch settings AHEAD:L2, e.g. 64:0 128:1 "
                    "(ra_host.tune; the default 32:0 always runs), each also with top-k 16 (the scan alone)")
    a = ap.parse_args()
    from scbench.kernels import ra_host
    from scbench.methods.retrieval_host import host_partial
    from scbench.methods.retrieval_search import Workspace

    print(json.dumps({"threads": torch.get_num_threads(), "ra_host": ra_host.info(),
                      "thp": open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()}), flush=True)
    g = torch.Generator().manual_seed(0)
    shape = (1, 8, a.n, 128)
    lo, hi = 128, a.n - 512
    ws = Workspace()
    srcs = [torch.randn(shape, generator=g).bfloat16() for _ in range(3)]  # contents cycled over the layers
    qs = [torch.randn(1, 32, 128, generator=g).bfloat16().float() for _ in range(a.layers)]
    for kind in a.kinds:
        if kind in ("pinned", "registered", "hugepage_registered") and not torch.cuda.is_available():
            continue
        t0 = time.perf_counter()
        layers = [(make(kind, srcs[2 * i % len(srcs)]), make(kind, srcs[(2 * i + 1) % len(srcs)]))
                  for i in range(a.layers)]
        setup = time.perf_counter() - t0
        host_partial(qs[0], layers[0][0], layers[0][1], lo, hi, 4096, False, 0.088, ws, native=True)

        def cycled(top_k: int) -> list[float]:
            ms = []
            for _ in range(a.reps):
                for i, (k, v) in enumerate(layers):
                    t1 = time.perf_counter()
                    host_partial(qs[i], k, v, lo, hi, top_k, False, 0.088, ws, native=True)
                    ms.append((time.perf_counter() - t1) * 1e3)
            return ms

        ms, same = cycled(4096), []
        tuned = {}
        for spec in ["32:0", *a.tunes]:
            ahead, l2 = (int(x) for x in spec.split(":"))
            ra_host.tune(ahead=ahead, l2=bool(l2))
            if spec != "32:0":
                tuned[f"ahead{spec}_ms"] = round(statistics.median(cycled(4096)), 3)
            tuned[f"ahead{spec}_topk16_ms"] = round(statistics.median(cycled(16)), 3)
        ra_host.tune()
        for i, (k, v) in enumerate(layers[:1]):
            t1 = time.perf_counter()
            for _ in range(a.reps * a.layers):
                host_partial(qs[i], k, v, lo, hi, 4096, False, 0.088, ws, native=True)
            same.append((time.perf_counter() - t1) * 1e3 / (a.reps * a.layers))
        print(json.dumps({"kind": kind, "n": a.n, "layers": a.layers, "setup_s": round(setup, 1),
                          "cycling_ms_median": round(statistics.median(ms), 3), "cycling_ms_min": round(min(ms), 3),
                          "one_layer_ms": round(same[0], 3), **tuned}), flush=True)
        if kind in ("registered", "hugepage_registered"):
            for k, v in layers:
                for t in (k, v):
                    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
        layers = []  # frees the buffers (the closure above reads the name)
    big = torch.empty(8 << 30, dtype=torch.uint8).view(torch.int64)  # 8 GiB: a plain read of DRAM, 16 threads
    big.fill_(1)
    t1 = time.perf_counter()
    for _ in range(2):
        big.sum()
    print(json.dumps({"dram_read_GBps_int64_sum": round(2 * big.numel() * 8 / (time.perf_counter() - t1) / 1e9, 1)}),
          flush=True)


if __name__ == "__main__":
    main()

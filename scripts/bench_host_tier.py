"""What moving a long context's KV into host memory costs on the GPU: RetrievalAttention's host tier
(``TieredLayer(..., storage="cpu")`` after the first prefill) and ``model.offload=cpu``'s park between requests
(``Tier.put`` / ``Tier.get``), Llama-3.1-8B-shaped layers (8 KV heads x head dim 128, bfloat16).

    python scripts/bench_host_tier.py [--tokens 131072] [--layers 8] [--out results/perf/host_tier.json]

Rows (seconds per layer, K and V together; medians over ``--layers`` distinct layers, each kept alive so that the
pinned allocator cannot hand back a freed block): the host tier with the old copy (``SCBENCH_HOST_BLOCK_COPY=0``:
torch's copy into the strided view of the pinned buffer) and the new one (one asynchronous copy per run of rows);
the pieces: pinned allocation (torch's caching host allocator, which rounds every block up to a power of two), a
pageable allocation touched and registered with ``cudaHostRegister`` (exact size; ``scbench.kv.pinned`` does this),
``pinned_empty`` itself, and the copies alone into a ready pinned buffer; the park's put / get, old and new. The
pinned cache is emptied between rows.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from scbench.kv import tier as tier_mod
from scbench.kv.offload import TieredLayer
from scbench.kv import pinned
from scbench.kv.tier import Tier

HKV, D = 8, 128


def empty_host_cache() -> None:
    for fn in ("torch.accelerator.empty_host_cache", "torch.cuda.memory.empty_host_cache", "torch._C._host_emptyCache"):
        obj = torch
        try:
            for part in fn.split(".")[1:]:
                obj = getattr(obj, part)
        except AttributeError:
            continue
        obj()
        return


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    n, L = args.tokens, args.layers
    kv = [(torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16),
           torch.randn(1, HKV, n, D, device=dev, dtype=torch.bfloat16)) for _ in range(L)]
    gib = 2 * HKV * n * D * 2 / 2**30
    rows: dict[str, float] = {}

    def row(name: str, per_layer: list[float]) -> None:
        name = name if name not in rows else f"{name}#2"  # the old / new pairs run twice
        rows[name] = statistics.median(per_layer)
        print(f"{name:<34} {rows[name] * 1e3:9.1f} ms/layer  {gib / rows[name]:6.1f} GiB/s", flush=True)

    for block in (False, True, False, True):
        tier_mod.BLOCK_COPY = block
        empty_host_cache()
        keep, ts = [], []
        for k, v in kv:
            ts.append(timed(lambda: keep.append(TieredLayer(k, v, storage="cpu"))))
        if block:  # the rows arrived whole
            assert torch.equal(keep[0].keys, kv[0][0].cpu()) and torch.equal(keep[-1].values, kv[-1][1].cpu())
        row(f"tiered_{'blocks' if block else 'torch'}", ts)
        keep.clear()
    tier_mod.BLOCK_COPY = True

    rows_cap = n + 1024
    for name, shape in (("pin_alloc_rounded", (1, HKV, rows_cap, D)), ("pin_alloc_pow2", (1, HKV, n, D))):
        empty_host_cache()
        keep, ts = [], []
        for _ in range(L):
            ts.append(timed(lambda: keep.extend(torch.empty(shape, dtype=torch.bfloat16, pin_memory=True)
                                                for _ in range(2))))
        row(name, ts)
        keep.clear()
    empty_host_cache()

    cudart = torch.cuda.cudart()
    keep, ts = [], []
    for _ in range(L):
        def reg():
            for _ in range(2):
                t = torch.empty((1, HKV, rows_cap, D), dtype=torch.bfloat16)
                t.view(torch.uint8).fill_(0)
                err = cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
                assert int(err) == 0, err
                keep.append(t)
        ts.append(timed(reg))
    row("register_exact_touched", ts)
    for huge in (False, True, False, True):
        pinned.HUGE_PAGES = huge
        keep_p, ts = [], []
        for _ in range(L):
            ts.append(timed(lambda: keep_p.extend(pinned.pinned_empty((1, HKV, rows_cap, D), torch.bfloat16)
                                                  for _ in range(2))))
        row("pinned_empty" + ("_huge" if huge else ""), ts)
        keep_p.clear()
    pinned.HUGE_PAGES = False
    for t in keep:
        cudart.cudaHostUnregister(t.data_ptr())
    keep.clear()

    bufs = [torch.empty((1, HKV, rows_cap, D), dtype=torch.bfloat16, pin_memory=True) for _ in range(2)]

    def strided(k, v):
        bufs[0][..., :n, :] = k
        bufs[1][..., :n, :] = v

    def blocks(k, v):
        for b, x in zip(bufs, (k, v)):
            dst = b.view(-1, rows_cap, D)[:, :n]
            for i in range(HKV):
                dst[i].copy_(x[0, i], non_blocking=True)

    row("copy_strided_torch", [timed(lambda: strided(k, v)) for k, v in kv])
    row("copy_blocks", [timed(lambda: blocks(k, v)) for k, v in kv])
    bufs.clear()
    empty_host_cache()

    for block in (False, True, False, True):
        tier_mod.BLOCK_COPY = block
        empty_host_cache()
        tier = Tier("cpu")
        tag = "pinned" if block else "torch"
        row(f"park_put_{tag}", [timed(lambda: tier.put(f"l{i}", {"k": k, "v": v})) for i, (k, v) in enumerate(kv)])
        row(f"park_get_{tag}", [timed(lambda: tier.get(f"l{i}", dev)) for i in range(L)])
        got = tier.get("l0", dev)
        assert torch.equal(got["k"], kv[0][0]) and torch.equal(got["v"], kv[0][1])
        tier.close()
    tier_mod.BLOCK_COPY = True

    out = {"what": "host tier / park copies of one Llama-3.1-8B-shaped layer (K+V), seconds per layer (median)",
           "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": n, "layers": L,
           "gib_per_layer": gib, "rows": rows,
           "per_32_layers_s": {k: v * 32 for k, v in rows.items()}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["per_32_layers_s"], indent=1))


if __name__ == "__main__":
    main()

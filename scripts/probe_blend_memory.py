"""CacheBlend's first prefill (``blend.blended_prefill``, through a session's feed as `scbench run` calls it): its
peak memory above the model, as a share of the blended cache it leaves (one full KV cache of the prompt), with and
without ``measure_full``'s throwaway full prefill. Random weights (``probe_decode_memory.engine_for``'s shapes).

Before b9157db the first prefill held the chunk KV twice (the pieces and their concatenation), then the chunk KV
and its copy padded with the last token's slot, and ran the full prefill beside the blended cache (~3x the cache
above it: 131K on Llama-3.1-8B ran out of an 80 GB H100); since then one buffer per layer with the slot, replaced
layer by layer, and the full prefill first.

    MALLOC_MMAP_THRESHOLD_=1048576 SCBENCH_BLEND_BATCH_TOKENS=1024 \
    python3 -P scripts/probe_blend_memory.py --device cpu --tokens 8192 --layers 16 \
        --out results/perf/blend_memory_cpu.json        # float32, a narrow model: the mechanism on a CPU
(on a CPU the fixed mmap threshold lets freed tensors leave the resident set, else the peak RSS is noise; 1,024
tokens per chunk-KV forward keep that forward's own cache at 1/8 of the KV, as 16,384 tokens are at 131K)
    python3 -P scripts/probe_blend_memory.py --device cuda --tokens 131072 --layers 8   # Llama-3.1-8B's layer shape
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from scbench import devices
from scbench.kv import cache as kvc
from scbench.methods.cacheblend import CacheBlend

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_decode_memory import engine_for, peak, resident  # noqa: E402 (the same random model and counters)


def first_prefill(engine, device: str, tokens: int, measure_full: bool) -> dict:
    ids = torch.randint(0, 256, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    s = engine.session(CacheBlend(measure_full=measure_full))
    devices.sync(device)
    held = resident(device)  # the model
    devices.start_peak([torch.device(device)])
    t0 = time.perf_counter()
    s.feed(ids, compress=True, sparse=True)
    devices.sync(device)
    seconds = time.perf_counter() - t0
    kv = kvc.kv_nbytes(s.cache)
    extra, kept = peak(device) - held, resident(device) - held
    out = {"measure_full": measure_full, "kv_bytes": kv, "extra_peak_bytes": extra, "peak_vs_kv": round(extra / kv, 3),
           "kept_vs_kv": round(kept / kv, 3), "seconds": round(seconds, 3),
           "costs": {k: round(v, 4) for k, v in s.method.take_costs(s).items()}}
    del s
    devices.free_cached_memory()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    engine = engine_for(args.device, args.layers, args.tokens + 4096)
    rows = [first_prefill(engine, args.device, args.tokens, m) for m in (True, False)]
    print("| tokens | layers | measure_full | KV MiB | peak above the model (x the KV) | held after (x the KV) "
          "| seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {args.tokens} | {args.layers} | {r['measure_full']} | {r['kv_bytes'] / 2**20:.0f} | "
              f"{r['peak_vs_kv']} | {r['kept_vs_kv']} | {r['seconds']} |")
    if args.out:
        meta = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
                "commit": os.environ.get("SCBENCH_COMMIT", ""), "args": vars(args)}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

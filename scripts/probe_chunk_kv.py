"""CacheBlend's chunk KV (``blend.chunk_kv``): one forward per chunk (``chunk_kv_loop``, the form before, and the
reference) against the chunks of one length batched as the rows of a forward (``SCBENCH_BLEND_BATCH_TOKENS`` tokens
per forward), each chunk computed alone from position 0 as a KV store would hold it. Seconds per prompt and the
largest difference between the two (0 where they are bit for bit equal).

    python3 -P scripts/probe_chunk_kv.py --device cpu --tokens 2048 4096 \
        --out results/perf/chunk_kv_cpu.json              # the embedded SmolLM2-135M, float32
    python3 -P scripts/probe_chunk_kv.py --device cuda --model llama8b --tokens 32768 131072 \
        --out results/perf/chunk_kv_h200.json             # Llama-3.1-8B's shape, random bf16 weights, 32 layers
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from scbench.engines import blend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def model_for(name: str, device: str, layers: int):
    if name == "embedded":
        from scbench.run import get_engine

        return get_engine({"name": "smollm2-135m", "path": "embedded:smollm2", "device": device}).model
    from support import llama8b_engine  # noqa: E402 (the GPU tests' random 8B-shaped model, CUDA)

    return llama8b_engine(layers).model


def timed(fn, device: str) -> tuple[float, tuple]:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="embedded", choices=["embedded", "llama8b"])
    ap.add_argument("--layers", type=int, default=32, help="llama8b: decoder layers")
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048])
    ap.add_argument("--chunk", type=int, default=256, help="CacheBlend's chunk_size (its default)")
    ap.add_argument("--batch-tokens", type=int, default=blend.BATCH_TOKENS)
    ap.add_argument("--out")
    a = ap.parse_args()
    model = model_for(a.model, a.device, a.layers)
    g = torch.Generator().manual_seed(0)
    small = torch.randint(10, 1000, (2 * a.chunk + 1,), generator=g).tolist()
    blend.chunk_kv_loop(model, small, a.chunk, 0)  # one-time work (kernels, allocator) out of the timings
    blend.chunk_kv(model, small, a.chunk, 0, batch_tokens=a.batch_tokens)
    rows = []
    for n in a.tokens:
        ids = torch.randint(10, 1000, (n,), generator=g).tolist()
        loop_s, want = timed(lambda: blend.chunk_kv_loop(model, ids, a.chunk, 0), a.device)
        batch_s, got = timed(lambda: blend.chunk_kv(model, ids, a.chunk, 0, batch_tokens=a.batch_tokens), a.device)
        pairs = list(zip(got[0] + got[1], want[0] + want[1]))
        rows.append({"tokens": n, "chunk": a.chunk, "batch_tokens": a.batch_tokens, "loop_s": round(loop_s, 3),
                     "batched_s": round(batch_s, 3), "speedup": round(loop_s / batch_s, 2),
                     "equal": all(torch.equal(x, y) for x, y in pairs),
                     "max_abs_diff": max(float((x.float() - y.float()).abs().max()) for x, y in pairs)})
        print(json.dumps(rows[-1]), flush=True)
        del want, got, pairs
    print("\n| tokens | chunk | tokens per forward | one forward per chunk s | batched s | speed-up | equal | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['chunk']} | {r['batch_tokens']} | {r['loop_s']:.2f} | {r['batched_s']:.2f} | "
              f"{r['speedup']:.2f}x | {r['equal']} | {r['max_abs_diff']:.1e} |")
    if a.out:
        dev = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        meta = {"device": dev, "torch": torch.__version__, "commit": os.environ.get("SCBENCH_COMMIT", ""),
                "model": a.model, "dtype": str(next(model.parameters()).dtype), "args": vars(a)}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

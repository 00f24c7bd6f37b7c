"""Where a decode step's GPU time goes, per method: CUDA kernel time of eager static-cache steps by kernel name.

    python scripts/profile_decode_step.py --length 32000 --methods full quest kivi --tokenizer DIR --out F.json

Builds the random Llama-3.1-8B-shaped bf16 model in memory, prefills ``length`` random tokens per method
(compression on), then runs ``--steps`` decode steps of the fast path eagerly (no graph: the profiler sees every
kernel) under ``torch.profiler``, and a graph-replayed decode for the step time. Prints the top kernels per method
(CUDA time per step) and writes them to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from scbench.engines import fastdecode
from scbench.engines.hf import HFEngine
from scbench.run import build_method

CONFIGS = {"full": {"name": "full"}, "quest": {"name": "quest", "budget": 4096},
           "kivi": {"name": "kivi", "bits": 2, "group": 32, "residual": 32}, "snapkv": {"name": "snapkv", "budget": 4096}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32000)
    ap.add_argument("--methods", nargs="+", default=["full", "quest", "kivi"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--tokenizer")
    ap.add_argument("--out")
    a = ap.parse_args()
    eng = HFEngine("random:llama-3.1-8b", tokenizer_path=a.tokenizer, device="cuda")
    ids = torch.randint(0, 40000, (a.length,), generator=torch.Generator().manual_seed(0)).tolist()
    report = {}
    for name in a.methods:
        method = build_method(CONFIGS[name])
        s = eng.session(method)
        s.feed(ids, compress=True, sparse=False)
        first = int(s.last_logits.argmax())
        plugin = fastdecode.plugin_for(method)
        dec = fastdecode.FastDecoder(eng.model, eng.device, use_graph=False, plugin=plugin)
        dec.generate(s.cache, s.pos, first, 3, set())  # compile + warm
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec.generate(s.cache, s.pos, first, a.steps + 1, set())
            torch.cuda.synchronize()
        rows = [(e.key, e.device_time_total / a.steps / 1000, e.count // a.steps) for e in prof.key_averages()]
        rows.sort(key=lambda r: -r[1])
        total = sum(r[1] for r in rows)
        graph = fastdecode.FastDecoder(eng.model, eng.device, use_graph=True, plugin=fastdecode.plugin_for(method))
        graph.generate(s.cache, s.pos, first, 8, set())
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = graph.generate(s.cache, s.pos, first, 65, set())
        torch.cuda.synchronize()
        step = (time.perf_counter() - t0) / (len(n) - 1) * 1000
        report[name] = {"kernel_ms_per_step": total, "graph_step_ms": step, "kernels_per_step": sum(r[2] for r in rows),
                        "top": [{"kernel": k[:90], "ms": ms, "count": c} for k, ms, c in rows[:15]]}
        print(f"== {name}: kernels {total:.2f} ms/step ({report[name]['kernels_per_step']} launches), "
              f"graph step {step:.2f} ms")
        for k, ms, c in rows[:10]:
            print(f"  {ms:7.3f} ms  x{c:<4d} {k[:100]}")
        del s, dec, graph
        torch.cuda.empty_cache()
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

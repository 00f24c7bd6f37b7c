"""KIVI decoded batched (methods/kivi_batch.py) vs one request at a time (methods/kivi_fast.py), multi-request,
on the Llama-3.1-8B shape with random bf16 weights: the turns' decode seconds, the batch's step time, agreement of
predictions (bf16: not bit-exact) and the peak memory (the de-quantised shared context is held during the batch).

    python scripts/bench_kivi_batch.py --length 32768 --turns 5 --max-new 64 [--bits 2 4] [--tok TOKENIZER_DIR]

Each configuration runs once at 2K first (kernel compilation, graph capture out of the timed runs). Prints one
JSON line per (bits, timing) and a summary line.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch


def run(engine, cls, method: dict, ex, turns: int, max_new: int, length: int):
    from scbench.records import RunSpec
    from scbench.registry import TASKS
    from scbench.run import build_method

    spec = RunSpec(model={}, method=method, task="scbench_kv", mode="multi_request", max_turns=turns,
                   max_new_tokens=max_new, max_seq_length=length + 8192)
    cuda = engine.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rows = list(cls(engine, build_method(method), TASKS.get("scbench_kv"), ex, spec))
    if cuda:
        torch.cuda.synchronize()
    return rows, time.perf_counter() - t0, torch.cuda.max_memory_allocated() if cuda else 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--bits", type=int, nargs="+", default=[2])
    ap.add_argument("--tok", default=os.environ.get("TOK"))
    ap.add_argument("--cpu", action="store_true", help="smoke test: tiny random Llama, float32, CPU")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from scbench.batch import BatchedReplay
    from scbench.data import load_examples
    from scbench.engines.hf import HFEngine
    from scbench.engines.models import random_model, resolve
    from scbench.registry import TASKS
    from scbench.runner import Replay

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(a.tok or resolve("embedded:smollm2"))
    if a.cpu:
        engine = HFEngine("random:tiny-llama", name="random:tiny-llama", model=random_model("tiny-llama", tokenizer=tok),
                          tokenizer=tok, device="cpu", dtype="float32")
    else:
        model = random_model("llama-3.1-8b", tokenizer=tok, dtype=torch.bfloat16, device="cuda")
        engine = HFEngine("random:llama-3.1-8b", name="random:llama-3.1-8b", model=model, tokenizer=tok,
                          device="cuda", dtype="bfloat16")
    count = lambda t: len(tok.encode(t, add_special_tokens=False))  # noqa: E731
    data = {n: load_examples(TASKS.get("scbench_kv"), "generated", n=1, length=n, turns=a.turns, seed=0,
                             count=count)[0] for n in sorted({2048, a.length})}
    print(f"# model + data {time.perf_counter() - t0:.1f}s", flush=True)
    summary = {}
    for bits in a.bits:
        method = {"name": "kivi", "bits": bits}
        out = {}
        for name, cls in (("sequential", Replay), ("batched", BatchedReplay)):
            t1 = time.perf_counter()
            run(engine, cls, method, data[2048], a.turns, a.max_new, 2048)  # warm-up
            rows, wall, peak = run(engine, cls, method, data[a.length], a.turns, a.max_new, a.length)
            st = [r.stats for r in rows]
            out[name] = rows
            rec = {"bits": bits, "timing": name, "length": a.length, "turns": len(rows), "wall_s": round(wall, 3),
                   "prefill_s": round(sum(s.prefill_s for s in st), 3),
                   "decode_s": round(sum(s.decode_s for s in st), 4),
                   "tokens": sum(s.decode_tokens for s in st),
                   "decode_step_s": [round(s.decode_step_s, 5) for s in st][:1],
                   "decode_path": sorted({s.decode_path for s in st}),
                   "decode_kernel": sorted({s.decode_kernel for s in st}),
                   "kv_bytes": [s.kv_bytes for s in st], "peak_mem_gib": round(peak / 2**30, 2),
                   "with_warmup_s": round(time.perf_counter() - t1, 1)}
            print(json.dumps(rec), flush=True)
            summary[(bits, name)] = rec
        same = sum(x.prediction == y.prediction for x, y in zip(out["sequential"], out["batched"]))
        s, b = summary[(bits, "sequential")], summary[(bits, "batched")]
        speedup = round(s["decode_s"] / max(b["decode_s"], 1e-9), 2)
        print(json.dumps({"bits": bits, "summary": True, "decode_speedup": speedup,
                          "same_predictions": f"{same}/{len(out['batched'])}",
                          "same_kv_bytes": s["kv_bytes"] == b["kv_bytes"]}), flush=True)


if __name__ == "__main__":
    main()

"""RetrievalAttention device tier (methods/retrieval_fast.py): attention per 32-layer decode step, before vs now, and
each stage alone (CUDA). Reuses scripts/bench_quest_decode.py's harness (random Llama-3.1-8B-shaped K/V, one query
per layer, the step captured in a CUDA graph).

    python scripts/bench_ra_device.py --lengths 32768 131072 [--variants] [--stages] --out F.json

Variants (``RetrievalDecode`` switches): ``before`` = a memset per layer, matmul scores, separate merge kernel (the
defaults of batch 1 on 2026-12-01); ``step_work`` = one memset per step; ``+merge`` = the paged kernel merges its
splits; ``fused*`` = the scan+histogram kernel (scbench/kernels/topk_select.py) with its chunk / block sizes.
Prints ms per step and the largest |difference| of each variant's bf16 output from ``before``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quest_decode import HKV, HQ, D, L, _diff, make_kv, step_fn, time_graph, write_report  # noqa: E402

from scbench.methods.retrieval_attention import RetrievalAttention  # noqa: E402
from scbench.methods.retrieval_fast import RetrievalDecode  # noqa: E402

VARIANTS = {
    "step_work": dict(step_work=True),
    "step_work+merge": dict(step_work=True, merge=True),
    "fused": dict(step_work=True, fused=True, score_args={"block": 128}),
    "one_launch": dict(step_work=True, one_launch=True),
    "one_launch+merge": dict(step_work=True, one_launch=True, merge=True),
    # select=sample (scbench/kernels/sample_select.py) with its filter chunk / sample block / warps
    "sample": dict(step_work=True, select="sample"),
    "sample+merge": dict(step_work=True, select="sample", merge=True),
    "sample_fuse": dict(step_work=True, select="sample", sample={"fuse": True}),
    "sample_fuse_w16": dict(step_work=True, select="sample", sample={"fuse": True, "num_warps": 16}),
    "sample_fuse_c16k": dict(step_work=True, select="sample", sample={"fuse": True, "chunk": 16384, "num_warps": 16}),
    "sample_fuse+merge": dict(step_work=True, select="sample", merge=True, sample={"fuse": True}),
    "sample_c4k": dict(step_work=True, select="sample", sample={"chunk": 4096}),
    "sample_c16k": dict(step_work=True, select="sample", sample={"chunk": 16384}),
    "sample_c32k": dict(step_work=True, select="sample", sample={"chunk": 32768, "num_warps": 16}),
    "sample_b1": dict(step_work=True, select="sample", sample={"block": 1}),
    "sample_b16": dict(step_work=True, select="sample", sample={"block": 16}),
    "sample_s2k": dict(step_work=True, select="sample", sample={"samples": 2048, "block": 4}),
    "sample_w4": dict(step_work=True, select="sample", sample={"num_warps": 4}),
    "sample_fw8": dict(step_work=True, select="sample", sample={"final_warps": 8}),
    "sample_fw32": dict(step_work=True, select="sample", sample={"final_warps": 32}),
}
BEFORE = dict(step_work=False, fused=False, merge=False, score_args={}, select="radix")


def plugin(gqa: str = "head", **switches) -> RetrievalDecode:
    p = RetrievalDecode(RetrievalAttention(top_k=4096, n_init=128, n_local=512, gqa=gqa, tier="device"))
    for k, v in switches.items():
        setattr(p, k, v)
    return p


def stages(kv, q, report, n) -> None:
    """Each stage of the default path alone over 32 layers (inputs precomputed)."""
    from scbench.kernels import paged_decode, row_select, sample_select, topk_select

    nn = kv.at[:1] + 1
    p = plugin()
    rs = [(q[l].reshape(1, HKV, HQ // HKV, D) @ kv.k[l].transpose(-1, -2)).reshape(1, HQ, -1) for l in range(L)]
    rr = [p.rows(kv, l, q[l]) for l in range(L)]
    work = torch.zeros(L, row_select.work_size(HQ), dtype=torch.int32, device="cuda")
    cand = torch.empty(HQ * sample_select.cap_for(4096), dtype=torch.int32, device="cuda")
    fns = {
        "stage_scores_matmul": lambda: [q[l].reshape(1, HKV, HQ // HKV, D) @ kv.k[l].transpose(-1, -2)
                                        for l in range(L)],
        "stage_radix_select": lambda: [topk_select.radix_select_triton(rs[l], nn, 4096, 128, 512, static=True)
                                       for l in range(L)],
        "stage_sample_select": lambda: [work.zero_()] + [sample_select.sample_select_triton(
            rs[l], nn, 4096, 128, 512, cnt=work[l], cand=cand) for l in range(L)],
        "stage_sample_fused": lambda: [work.zero_()] + [sample_select.sample_select_triton(
            rs[l], nn, 4096, 128, 512, cnt=work[l], cand=cand, fuse=True) for l in range(L)],
        "stage_select_one": lambda: [work.zero_()] + [row_select.radix_select_one(rs[l], nn, 4096, 128, 512, work[l])
                                                      for l in range(L)],
        "stage_paged_attn": lambda: [paged_decode.paged_attention_triton(q[l], kv.k[l], kv.v[l], rr[l], nn, 1,
                                                                         D ** -0.5, **p.tune) for l in range(L)],
    }
    for name, fn in fns.items():
        try:
            ms, _ = time_graph(fn)
        except Exception as e:
            print(f"n={n:7d} {name} FAILED {type(e).__name__}: {str(e)[:800]}", flush=True)
            continue
        report["results"].append({"length": n, "variant": name, "ms": round(ms, 4)})
        print(f"n={n:7d} {name:24s} {ms:8.3f} ms/step", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--variants", nargs="*", default=["step_work", "one_launch", "one_launch+merge"])
    ap.add_argument("--extra", nargs="*", default=[],
                    help="variants run last, at the first length only (after the stages)")
    ap.add_argument("--stages", action="store_true")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: skip what would start after this")
    ap.add_argument("--out")
    a = ap.parse_args()
    t0 = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": []}
    phases = [(n, False) for n in a.lengths] + [(a.lengths[0], True)]  # main variants everywhere, then details
    for n, detail in phases:
        if detail and time.perf_counter() - t0 > a.budget:
            break
        kv, q = make_kv(n, n + 256)

        def run(name, p):
            if time.perf_counter() - t0 > a.budget:
                print(f"n={n:7d} {name} skipped (budget)", flush=True)
                return None
            try:
                ms, outs = time_graph(step_fn(kv, q, p))
            except Exception as e:  # one failing variant must not hide the others
                print(f"n={n:7d} {name} FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
                return None
            report["results"].append({"length": n, "variant": name, "ms": round(ms, 4)})
            print(f"n={n:7d} {name:24s} {ms:8.3f} ms/step", flush=True)
            return outs

        if not detail:
            run("full", None)
        ref = run("before", plugin(**BEFORE)) if not detail else None
        if detail and a.stages:
            stages(kv, q, report, n)
        for name in a.extra if detail else a.variants:
            got = run(name, plugin(**VARIANTS[name]))
            if got is not None and ref is not None:
                diff = _diff(got, ref)
                report["results"].append({"length": n, "variant": name + "_diff", "max_abs": diff})
                print(f"  {name} vs before: max |diff| {diff:.4g}", flush=True)
        del kv, q
        torch.cuda.empty_cache()
    write_report(report, a.out)


if __name__ == "__main__":
    main()

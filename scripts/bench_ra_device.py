"""RetrievalAttention device tier (methods/retrieval_fast.py): attention per 32-layer decode step, before vs now, and
each stage alone (CUDA). Reuses scripts/bench_quest_decode.py's harness (random Llama-3.1-8B-shaped K/V, one query
per layer, the step captured in a CUDA graph).

    python scripts/bench_ra_device.py --lengths 32768 131072 [--variants] [--stages] --out F.json

Variants (``RetrievalDecode`` switches): ``before`` = a memset per layer, matmul scores, separate merge kernel (the
defaults of batch 1 on 2026-12-01); ``step_work`` = one memset per step; ``+merge`` = the paged kernel merges its
splits; ``fused*`` = the scan+histogram kernel (scbench/kernels/topk_select.py) with its chunk / block sizes;
``sample*`` = scbench/kernels/sample_select.py; ``prev*`` = scbench/kernels/prev_select.py (the previous step's
threshold; ``prev_fused*``: its filter computes the scores too; ``prev_fallback``: every row on the whole-row path).
Prints ms per step and the largest |difference| of each variant's bf16 output from ``before`` (the radix select).
``--sets``: prev_select's selected sets against radix's on the same scores; ``--drift V``: variant V's captured step
with fresh random queries every step (its whole-row fallbacks counted).
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
    "step_work": dict(step_work=True, select="radix"),
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
    # select=prev (scbench/kernels/prev_select.py): the previous step's threshold, a filter and a candidate pick
    "prev": dict(step_work=True, select="prev"),
    "prev_m8": dict(step_work=True, select="prev", prev={"margin": 8}),
    "prev_m32": dict(step_work=True, select="prev", prev={"margin": 32}),
    "prev_atomic": dict(step_work=True, select="prev", prev={"atomic": True}),
    "prev_hist": dict(step_work=True, select="prev", prev={"atomic": False}),
    "prev_c1k_w4": dict(step_work=True, select="prev", prev={"chunk": 1024, "num_warps": 4}),
    "prev_c2k_m8": dict(step_work=True, select="prev", prev={"chunk": 2048, "margin": 8}),
    "prev_c2k_l4": dict(step_work=True, select="prev", prev={"chunk": 2048, "loop": 4}),
    "prev_l4": dict(step_work=True, select="prev", prev={"loop": 4}),
    "prev_p512": dict(step_work=True, select="prev", prev={"part": 512}),
    "prev_p2k_w8": dict(step_work=True, select="prev", prev={"part": 2048, "pick_warps": 8}),
    "prev_one": dict(step_work=True, select="prev", prev={"one": True}),  # filter + pick in one launch
    "prev_one_atomic": dict(step_work=True, select="prev", prev={"one": True, "atomic": True}),
    "prev_c8k": dict(step_work=True, select="prev", prev={"chunk": 8192}),
    "prev_c2k_w4": dict(step_work=True, select="prev", prev={"chunk": 2048, "num_warps": 4}),
    "prev_c2k": dict(step_work=True, select="prev", prev={"chunk": 2048}),
    "prev_c2k_atomic": dict(step_work=True, select="prev", prev={"chunk": 2048, "atomic": True}),
    "prev_c1k_w4_atomic": dict(step_work=True, select="prev", prev={"chunk": 1024, "num_warps": 4, "atomic": True}),
    "prev_c2k_l4": dict(step_work=True, select="prev", prev={"chunk": 2048, "loop": 4}),
    "prev_l4": dict(step_work=True, select="prev", prev={"loop": 4}),
    "prev_p512": dict(step_work=True, select="prev", prev={"part": 512}),
    "prev_p2k": dict(step_work=True, select="prev", prev={"part": 2048}),
    "prev_fallback": dict(step_work=True, select="prev", prev={"margin": -2000}),  # every row's whole-row path
    "prev_split16": dict(step_work=True, select="prev", prev={"split": 16}),  # whole-row rows: a 16-warp launch
    "prev_fallback_split16": dict(step_work=True, select="prev", prev={"margin": -2000, "split": 16}),
    "prev_fused": dict(step_work=True, select="prev", prev_fused=True),
    "prev_fused_bn256": dict(step_work=True, select="prev", prev_fused=True, prev={"bn": 256, "num_warps": 8}),
    "prev_fused_bn64": dict(step_work=True, select="prev", prev_fused=True, prev={"bn": 64, "num_warps": 4}),
    "prev_fused_t4": dict(step_work=True, select="prev", prev_fused=True, prev={"tiles": 4}),
    "prev_fused_w8": dict(step_work=True, select="prev", prev_fused=True, prev={"num_warps": 8}),
    "prev_fused_hist": dict(step_work=True, select="prev", prev_fused=True, prev={"atomic": False}),
}
BEFORE = dict(step_work=False, fused=False, merge=False, score_args={}, select="radix")


def plugin(gqa: str = "head", **switches) -> RetrievalDecode:
    p = RetrievalDecode(RetrievalAttention(top_k=4096, n_init=128, n_local=512, gqa=gqa, tier="device"))
    for k, v in switches.items():
        setattr(p, k, v)
    return p


def stages(kv, q, report, n, names=()) -> None:
    """Each stage of the default path alone over 32 layers (inputs precomputed)."""
    from scbench.kernels import paged_decode, prev_scores, prev_select, row_select, sample_select, topk_select

    nn = kv.at[:1] + 1
    p = plugin()
    rs = [(q[l].reshape(1, HKV, HQ // HKV, D) @ kv.k[l].transpose(-1, -2)).reshape(1, HQ, -1) for l in range(L)]
    rr = [p.rows(kv, l, q[l]) for l in range(L)]
    work = torch.zeros(L, row_select.work_size(HQ), dtype=torch.int32, device="cuda")
    cand = torch.empty(HQ * sample_select.cap_for(4096), dtype=torch.int32, device="cuda")
    thr = torch.zeros(L, HQ, dtype=torch.int32, device="cuda")  # warmed by time_graph's eager steps
    pwork = torch.zeros(L, prev_select.work_size(HQ), dtype=torch.int32, device="cuda")
    pcand = torch.empty(HQ * 16384, dtype=torch.int32, device="cuda")
    fns = {
        "stage_scores_matmul": lambda: [q[l].reshape(1, HKV, HQ // HKV, D) @ kv.k[l].transpose(-1, -2)
                                        for l in range(L)],
        "stage_radix_select": lambda: [topk_select.radix_select_triton(rs[l], nn, 4096, 128, 512, static=True)
                                       for l in range(L)],
        "stage_sample_select": lambda: [work.zero_()] + [sample_select.sample_select_triton(
            rs[l], nn, 4096, 128, 512, cnt=work[l], cand=cand) for l in range(L)],
        "stage_sample_fused": lambda: [work.zero_()] + [sample_select.sample_select_triton(
            rs[l], nn, 4096, 128, 512, cnt=work[l], cand=cand, fuse=True) for l in range(L)],
        "stage_prev_select": lambda: [pwork.zero_()] + [prev_select.prev_select_triton(
            rs[l], nn, 4096, 128, 512, thr[l], q=q[l], work=pwork[l], cand=pcand) for l in range(L)],
        "stage_prev_filter": lambda: [pwork.zero_()] + [prev_select.prev_select_triton(
            rs[l], nn, 4096, 128, 512, thr[l], q=q[l], work=pwork[l], cand=pcand, filter_only=True) for l in range(L)],
        "stage_prev_fused_scores_select": lambda: [pwork.zero_()] + [prev_scores.prev_scores_select_triton(
            q[l], kv.k[l], nn, 4096, 128, 512, False, thr[l], work=pwork[l], cand=pcand) for l in range(L)],
        "stage_select_one": lambda: [work.zero_()] + [row_select.radix_select_one(rs[l], nn, 4096, 128, 512, work[l])
                                                      for l in range(L)],
        "stage_paged_attn": lambda: [paged_decode.paged_attention_triton(q[l], kv.k[l], kv.v[l], rr[l], nn, 1,
                                                                         D ** -0.5, **p.tune) for l in range(L)],
    }
    for name, fn in fns.items():
        if names and name not in names:
            continue
        try:
            ms, _ = time_graph(fn)
        except Exception as e:
            print(f"n={n:7d} {name} FAILED {type(e).__name__}: {str(e)[:800]}", flush=True)
            continue
        report["results"].append({"length": n, "variant": name, "ms": round(ms, 4)})
        print(f"n={n:7d} {name:24s} {ms:8.3f} ms/step", flush=True)


def drift(kv, q, report, n, name, steps: int = 8) -> None:
    """The captured step of variant ``name`` with fresh random queries each step (like ``make_kv``'s): ms per
    step and the rows that took prev_select's whole-row path (its threshold from the previous step missed)."""
    from scbench.kernels import prev_select

    p = plugin(**VARIANTS[name])
    step = step_fn(kv, q, p)
    step(), step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    gen = torch.Generator(device="cuda").manual_seed(n + 1)
    rows = HQ if p.m.gqa == "head" else HKV
    total, slow = 0.0, []
    for _ in range(steps):
        for ql in q:
            ql.copy_(torch.randn(ql.shape, device="cuda", dtype=ql.dtype, generator=gen) * 2)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        torch.cuda.synchronize()
        total += e0.elapsed_time(e1)
        slow.append(sum(int(prev_select.slow_rows(p.work[l], rows).item()) for l in range(L)))
    report["results"].append({"length": n, "variant": name + "_drift", "ms": round(total / steps, 4),
                              "slow_rows_per_step": slow, "rows_per_step": rows * L})
    print(f"n={n:7d} {name + '_drift':24s} {total / steps:8.3f} ms/step (fresh queries); whole-row rows per step "
          f"{slow} of {rows * L}", flush=True)


def same_sets(kv, q, report, n) -> None:
    """prev_select's lists (second call: from its candidates) against the radix select's on the same scores:
    the same selected score multiset in every row of every layer."""
    from scbench.kernels import prev_select, topk_select

    nn = kv.at[:1] + 1
    bad, slow = 0, 0
    for l in range(L):
        s = (q[l].reshape(1, HKV, HQ // HKV, D) @ kv.k[l].transpose(-1, -2)).reshape(1, HQ, -1)
        want = topk_select.radix_select_triton(s, nn, 4096, 128, 512, static=True)
        thr = torch.zeros(HQ, dtype=torch.int32, device="cuda")
        for _ in range(2):
            work = torch.zeros(prev_select.work_size(HQ), dtype=torch.int32, device="cuda")
            got = prev_select.prev_select_triton(s, nn, 4096, 128, 512, thr, q=q[l], work=work)
        slow += int(prev_select.slow_rows(work, HQ).item())
        sv = lambda rows: torch.gather(s[0].float(), 1, rows[:, 640:].long()).sort(-1).values  # noqa: E731
        bad += int((sv(got) != sv(want)).any(-1).sum().item()) + int((got[:, :640] != want[:, :640]).any(-1).sum())
    report["results"].append({"length": n, "variant": "prev_vs_radix_sets", "rows_differing": bad,
                              "second_call_whole_row": slow})
    print(f"n={n:7d} prev vs radix: rows with a different selected multiset {bad} of {HQ * L}; second-call "
          f"whole-row rows {slow}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--variants", nargs="*", default=["step_work", "one_launch", "one_launch+merge"])
    ap.add_argument("--later", nargs="*", default=None, help="variants at the other lengths (default: --variants)")
    ap.add_argument("--extra", nargs="*", default=[],
                    help="variants run after the stages, at the first length only")
    ap.add_argument("--drift", nargs="*", default=[], help="prev variants re-run with fresh queries, first length")
    ap.add_argument("--stages", nargs="*", default=None, help="time each stage alone (only these names if given)")
    ap.add_argument("--sets", action="store_true", help="compare prev_select's sets with radix's, first length")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds: skip what would start after this")
    ap.add_argument("--out")
    a = ap.parse_args()
    for name in [*a.variants, *(a.later or []), *a.extra, *a.drift]:
        if name not in VARIANTS:
            ap.error(f"unknown variant {name!r}: one of {sorted(VARIANTS)}")
    t0 = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": []}
    phases = [(n, False) for n in a.lengths] + [(a.lengths[0], True)]  # variants everywhere, then the details
    for i, (n, detail) in enumerate(phases):
        if time.perf_counter() - t0 > a.budget:
            break
        if detail and not (a.sets or a.stages is not None or a.extra or a.drift):
            break
        kv, q = make_kv(n, n + 256)

        def run(name, p, ref=None):
            if time.perf_counter() - t0 > a.budget:
                print(f"n={n:7d} {name} skipped (budget)", flush=True)
                return None
            try:
                ms, outs = time_graph(step_fn(kv, q, p))
            except Exception as e:  # one failing variant must not hide the others
                print(f"n={n:7d} {name} FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
                return None
            report["results"].append({"length": n, "variant": name, "ms": round(ms, 4)})
            print(f"n={n:7d} {name:24s} {ms:8.3f} ms/step (elapsed {time.perf_counter() - t0:.0f} s)", flush=True)
            if ref is not None:
                diff = _diff(outs, ref)
                report["results"].append({"length": n, "variant": name + "_diff", "max_abs": diff})
                print(f"  {name} vs before (radix): max |diff| {diff:.4g}", flush=True)
            return outs

        if not detail:
            run("full", None)
            ref = run("before", plugin(**BEFORE))
            for name in a.variants if i == 0 or a.later is None else a.later:
                run(name, plugin(**VARIANTS[name]), ref)
        else:
            for step, want in ((lambda: same_sets(kv, q, report, n), a.sets),
                               (lambda: stages(kv, q, report, n, a.stages or ()), a.stages is not None)):
                if want and time.perf_counter() - t0 < a.budget:
                    try:
                        step()
                    except Exception as e:
                        print(f"n={n:7d} FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
            for name in a.drift:
                if time.perf_counter() - t0 < a.budget:
                    try:
                        drift(kv, q, report, n, name)
                    except Exception as e:
                        print(f"n={n:7d} {name} drift FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
            ref = run("before", plugin(**BEFORE)) if a.extra else None
            for name in a.extra:
                run(name, plugin(**VARIANTS[name]), ref)
        del kv, q
        torch.cuda.empty_cache()
    write_report(report, a.out)


if __name__ == "__main__":
    main()

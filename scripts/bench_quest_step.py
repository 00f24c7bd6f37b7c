"""Quest's decode attention per 32-layer step and per stage, old vs new variants (CUDA; extends
scripts/bench_quest_decode.py, whose shapes, step and graph timer it reuses).

    python -P scripts/bench_quest_step.py --lengths 32768 131072 [--budget-s 40] [--out F.json]

Llama-3.1-8B shapes (32 layers, 32 q / 8 KV heads, d 128, bf16, random K/V, Quest 4096, pages of 16, 2 dense
layers). Prints, per context length: ms per 32-layer attention step (CUDA graph) for full attention and Quest
variants (page select: bisection, radix histograms, interpolating search, two-stage; paged kernel with or without its in-kernel merge, or the union kernel reading each page of a KV group once);
each stage of one selecting layer timed alone over the 30 selecting layers (scores, select, paged attention) with
the bytes it must read and the TB/s reached; whether every select variant lists exactly the default's pages; the
per-turn work outside the graph (the plugin's bounds load). Stops adding variants after ``--budget-s`` seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_quest_decode import D, HKV, HQ, L, make_kv, step_fn, time_graph, write_report  # noqa: E402

from scbench.kernels import paged_decode, paged_dot, paged_union, quest_scores, quest_select  # noqa: E402
from scbench.kv.offload import TieredLayer  # noqa: E402
from scbench.methods.quest import Quest, page_bounds  # noqa: E402
from scbench.methods.quest_fast import QuestDecode  # noqa: E402

SELECTS = {"bisect": {}, "radix": {"radix": 1}, "search": {"radix": 2}, "bisect_w4": {"num_warps": 4},
           "search_w4": {"radix": 2, "num_warps": 4}, "seg1024": {"segment": 1024, "local_warps": 1},
           "seg1024_search": {"segment": 1024, "local_warps": 1, "radix": 2}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32000, 131000])
    ap.add_argument("--budget-s", type=float, default=40.0)
    ap.add_argument("--out")
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 8], help="--plan batch: batch sizes")
    ap.add_argument("--own", type=int, default=100, help="--plan batch: own tokens per row")
    ap.add_argument("--short", action="store_true", help="--plan tune: rows below 4,096 pages: three steps only")
    ap.add_argument("--plan", default="variants", choices=["variants", "profile", "batch", "tune", "final"],
                    help="profile: each stage of the default step at each length, with kernel-size variants "
                         "(bench_quest_profile.py)")
    a = ap.parse_args()
    if a.plan in ("profile", "batch", "tune", "final"):
        import bench_quest_profile

        return getattr(bench_quest_profile, a.plan)(a)
    t_start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": []}

    def rec(**kw):
        report["results"].append(kw)
        print(json.dumps(kw), flush=True)

    def timed(n, name, fn, **extra):
        if time.perf_counter() - t_start > a.budget_s:
            print(f"skip {n} {name}: past --budget-s", flush=True)
            return None
        try:
            ms, outs = time_graph(fn)
        except Exception as e:  # one failing variant must not hide the others
            print(f"n={n} {name} FAILED {type(e).__name__}: {str(e)[:800]}", flush=True)
            return None
        rec(length=n, variant=name, ms=round(ms, 4), **extra)
        return outs

    cases, refs = {}, {}

    def step(n, name, ref=False, **attrs):
        kv, q, quest = cases[n]
        for key, val in {"select_args": {}, "merge": False, "union": False, "segment": 0, "dot": False, "tune": {},
                         **attrs}.items():
            setattr(quest, key, val)
        out = timed(n, f"quest_step {name}", step_fn(kv, q, quest))
        if ref:
            refs[n] = out
        elif out is not None and refs.get(n) is not None:
            rec(length=n, variant=f"diff {name}", max_abs=max((x.float() - y.float()).abs().max().item()
                                                            for x, y in zip(out, refs[n])))

    search, seg = {"radix": 2}, {"segment": 1024}
    for n in a.lengths:  # 1. whole steps, the main variants (both lengths; seg: rows of >= 4,096 pages)
        kv, q = make_kv(n, -(-(n + 64) // 256) * 256)  # StaticKV's capacity for a 64-token turn
        quest = QuestDecode(Quest(budget=4096))
        quest.allocate(kv, None)
        quest.load(kv, None)
        cases[n] = kv, q, quest
        long = quest.kmin[quest.m.dense_layers].shape[2] >= 4096
        sg = seg if long else {}
        timed(n, "full_step", step_fn(kv, q, None))
        step(n, "bisect", ref=True)
        srch = search if long else {}  # the defaults: search + two stages for long rows, bisection else; merge
        step(n, "default (merge" + ", search, seg)" * long + ")" * (not long), select_args=srch, merge=True, **sg)
        step(n, "dot merge", select_args=srch, merge=True, dot=True, **sg)
        step(n, "dot merge stages2", select_args=srch, merge=True, dot=True, tune={"num_stages": 2}, **sg)
        step(n, "dot merge bp8", select_args=srch, merge=True, dot=True, tune={"block_pages": 8, "pages_per_split": 32},
             **sg)
        step(n, "dot merge w8", select_args=srch, merge=True, dot=True, tune={"num_warps": 8}, **sg)
    stage_data = {}
    for n, (kv, q, quest) in cases.items():  # 2. each stage alone over the 30 selecting layers, inputs precomputed
        m, at, nn = quest.m, kv.at[:1], kv.at[:1] + 1
        sl = range(m.dense_layers, L)
        p = quest.kmin[sl[0]].shape[2]
        qs = {l: quest_scores.quest_scores_triton(q[l], kv.k[l], quest.kmin[l], quest.kmax[l], at, 16, 1, False) for l in sl}
        kq = quest.top_k(p)
        lists = {}
        names = ("bisect", "search") + (("seg1024", "seg1024_search") if p >= 4096 else ())
        for name in names:
            kw = SELECTS[name]
            lists[name] = [quest_select.quest_select_triton(qs[l], nn, 16, m.budget, 1, kq, **kw) for l in sl]
            torch.cuda.synchronize()
            same = all(torch.equal(x.sort(-1).values, y.sort(-1).values) for x, y in zip(lists[name], lists["bisect"]))
            rec(length=n, variant=f"same_pages {name}", same=same)
        bounds = 2 * HKV * p * D * 2
        timed(n, "stage scores", lambda: [quest_scores.quest_scores_triton(q[l], kv.k[l], quest.kmin[l], quest.kmax[l],
                                                                            at, 16, 1, False) for l in sl],
              gb=round(len(sl) * bounds / 1e9, 3))
        for name in lists:
            timed(n, f"stage select {name}", lambda kw=SELECTS[name]: [quest_select.quest_select_triton(
                qs[l], nn, 16, m.budget, 1, kq, **kw) for l in sl])
        rows = quest.rows_loaded(n)
        attn = HQ * rows * D * 2 * 2
        pl = lists["bisect"]
        timed(n, "stage paged merge", lambda: [paged_decode.paged_attention_triton(
            q[l], kv.k[l], kv.v[l], pl[i], nn, 16, D ** -0.5, counter=quest.counter) for i, l in enumerate(sl)],
              gb=round(len(sl) * attn / 1e9, 3))
        timed(n, "stage dot merge", lambda: [paged_dot.paged_dot_triton(
            q[l], kv.k[l], kv.v[l], pl[i], nn, 16, D ** -0.5, counter=quest.counter) for i, l in enumerate(sl)],
              gb=round(len(sl) * attn / 1e9, 3))
        maps = []
        for l in sl:
            maps.append(torch.empty(qs[l].shape, dtype=torch.int8, device=qs[l].device))
            quest_select.quest_select_triton(qs[l], nn, 16, m.budget, 1, kq, map_out=maps[-1], **SELECTS[names[-1]])
        union = sum(int(mp.view(HKV, HQ // HKV, -1).amax(1).sum()) for mp in maps) * 16 * D * 2 * 2
        timed(n, "stage union merge", lambda: [paged_union.paged_union_triton(
            q[l], kv.k[l], kv.v[l], maps[i], nn, 16, D ** -0.5, counter=quest.counter) for i, l in enumerate(sl)],
              gb=round(union / 1e9, 3))
        stage_data[n] = qs, kq, pl, maps
    for n, (kv, q, quest) in cases.items():  # 3. per-turn work outside the graph: the plugin's bounds load, old
        # (min / max over every key) and new (the layers' own bounds copied; then, a turn later, the pages kept)
        layers = [TieredLayer(kv.k[l][:, :, : n - 1], kv.v[l][:, :, : n - 1], storage="device") for l in range(L)]
        for layer in layers:
            layer.state["quest"] = page_bounds(layer.keys, 16)
        cache = SimpleNamespace(layers=layers)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
        ev[0].record()
        quest.load(kv, None)
        ev[1].record()
        quest.load(kv, cache)
        ev[2].record()
        quest.store_back(kv, cache, 0)
        ev[3].record()
        quest.load(kv, cache)
        ev[4].record()
        torch.cuda.synchronize()
        rec(length=n, variant="turn bounds load", old_ms=round(ev[0].elapsed_time(ev[1]), 3),
            copy_layer_bounds_ms=round(ev[1].elapsed_time(ev[2]), 3), store_back_ms=round(ev[2].elapsed_time(ev[3]), 3),
            kept_ms=round(ev[3].elapsed_time(ev[4]), 3),
            adopted=all(x.keys.data_ptr() == kb.data_ptr() for x, kb in zip(layers, kv.k)))
        del layers, cache
    for n, (kv, q, quest) in cases.items():  # 4. more variants while time is left
        qs, kq, pl, maps = stage_data[n]
        m, nn, sl = quest.m, kv.at[:1] + 1, range(quest.m.dense_layers, L)
        timed(n, "stage paged", lambda: [paged_decode.paged_attention_triton(q[l], kv.k[l], kv.v[l], pl[i], nn, 16,
                                                                             D ** -0.5) for i, l in enumerate(sl)])
        timed(n, "stage union", lambda: [paged_union.paged_union_triton(q[l], kv.k[l], kv.v[l], maps[i], nn, 16, D ** -0.5)
                                         for i, l in enumerate(sl)])
        step(n, "search", select_args=search)
        step(n, "search union", select_args=search, union=True)
        for name in ("bisect_w4", "search_w4"):
            timed(n, f"stage select {name}", lambda kw=SELECTS[name]: [quest_select.quest_select_triton(
                qs[l], nn, 16, m.budget, 1, kq, **kw) for l in sl])
        p = maps[0].shape[-1]
        for tune in ({"block_pages": 8, "num_warps": 8}, {"range_pages": max(8, 2 ** (p * 8 // 1024).bit_length() // 2)}):
            timed(n, f"stage union {json.dumps(tune)}", lambda tune=tune: [paged_union.paged_union_triton(
                q[l], kv.k[l], kv.v[l], maps[i], nn, 16, D ** -0.5, **tune) for i, l in enumerate(sl)])
    for r in report["results"]:
        if "gb" in r and r.get("ms"):
            r["tb_s"] = round(r["gb"] / r["ms"], 3)
            print(f"{r['length']} {r['variant']}: {r['gb']} GB in {r['ms']} ms = {r['tb_s']} TB/s")
    write_report(report, a.out)


if __name__ == "__main__":
    main()

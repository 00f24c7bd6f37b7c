"""Where Quest's 32-layer decode step spends its time, stage by stage (CUDA; ``bench_quest_step.py --plan profile``).

    python -P scripts/bench_quest_step.py --plan profile --lengths 131000 32000 [--budget-s 60] [--out F.json]

Per context length (Llama-3.1-8B shapes, random bf16 K/V, Quest 4096, pages of 16, 2 dense layers, buffers sized as
StaticKV sizes them for a 64-token turn): the whole step (full attention and Quest's defaults), then each stage of the
30 selecting layers alone in a CUDA graph of 30 launches (inputs precomputed): the bounds update + page scores
(kernel-size variants; GB read and TB/s), the page select (the defaults; its second stage alone under several warp
counts; the threshold select of ``kernels/quest_select.py``), the paged attention (elementwise and matmul kernels,
sizes). Every select variant is checked to list the default's pages. Variants run in priority order until
``--budget-s`` seconds have passed.
"""
from __future__ import annotations

import json
import time

import torch

from bench_quest_decode import D, HKV, HQ, L, make_kv, step_fn, time_graph, write_report

from scbench.kernels import paged_decode, paged_dot, quest_scores, quest_select
from scbench.methods.quest import Quest
from scbench.methods.quest_fast import QuestDecode


def profile(a) -> None:
    t_start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "plan": "profile", "results": []}

    def rec(**kw):
        report["results"].append(kw)
        print(json.dumps(kw), flush=True)

    def timed(n, name, fn, gb=None):
        if time.perf_counter() - t_start > a.budget_s:
            print(f"skip {n} {name}: past --budget-s", flush=True)
            return None
        try:
            ms, outs = time_graph(fn)
        except Exception as e:  # one failing variant must not hide the others
            print(f"n={n} {name} FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
            return None
        extra = {} if gb is None else {"gb": round(gb, 3), "tb_s": round(gb / ms, 3)}
        rec(length=n, variant=name, ms=round(ms, 4), **extra)
        return outs

    for n in a.lengths:
        kv, q = make_kv(n, -(-(n + 64) // 256) * 256)
        quest = QuestDecode(Quest(budget=4096))
        quest.allocate(kv, None)
        quest.load(kv, None)
        m, at, nn = quest.m, kv.at[:1], kv.at[:1] + 1
        sl = list(range(m.dense_layers, L))
        p = quest.kmin[sl[0]].shape[2]
        long = p >= quest.segment_from
        timed(n, "step full", step_fn(kv, q, None))
        ref = timed(n, "step quest default", step_fn(kv, q, quest))
        t4 = {"num_warps": 4, "chunk": 8192}
        for name, attrs in (("threshold w4 c8192", {"threshold": True, "threshold_args": t4}),
                            ("threshold w4 c8192 pdl", {"threshold": True, "threshold_args": t4, "pdl": True}),
                            ("pdl", {"pdl": True}), ("dot", {"dot": True}),
                            ("threshold w4 c8192 dot pdl", {"threshold": True, "threshold_args": t4, "dot": True,
                                                            "pdl": True}),
                            ("select w1", {"select_args": {"num_warps": 1}}),
                            ("threshold w1", {"threshold": True})):
            if not all(hasattr(quest, k) for k in attrs):
                continue
            saved = {k: getattr(quest, k) for k in attrs}
            quest.__dict__.update(attrs)
            out = timed(n, f"step quest {name}", step_fn(kv, q, quest))
            quest.__dict__.update(saved)
            if out is not None and ref is not None:
                rec(length=n, variant=f"diff {name}", max_abs=max((x.float() - y.float()).abs().max().item()
                                                                for x, y in zip(out, ref)))
        # scores: bounds update + bound scores (reads min + max of every page)
        bounds_gb = len(sl) * 2 * HKV * p * D * 2 / 1e9
        for bp, w in ((64, 4), (128, 8), (32, 4)):
            timed(n, f"stage scores bp{bp} w{w}", lambda bp=bp, w=w: [quest_scores.quest_scores_triton(
                q[l], kv.k[l], quest.kmin[l], quest.kmax[l], at, 16, 1, False, block_pages=bp, num_warps=w)
                for l in sl], gb=bounds_gb)
        qs = {l: quest_scores.quest_scores_triton(q[l], kv.k[l], quest.kmin[l], quest.kmax[l], at, 16, 1, False)
              for l in sl}
        kq = quest.top_k(p)
        dflt = {"segment": quest.segment, "local_warps": 1, "radix": 2} if long else {}
        lists = [quest_select.quest_select_triton(qs[l], nn, 16, m.budget, 1, kq, **dflt) for l in sl]

        def same(got):
            torch.cuda.synchronize()
            return all(torch.equal(x, y) for x, y in zip(got, lists))

        timed(n, "stage select default", lambda: [quest_select.quest_select_triton(qs[l], nn, 16, m.budget, 1, kq, **dflt)
                                                  for l in sl])
        for tw in ({"num_warps": 4, "chunk": 8192}, {}, {"num_warps": 8, "chunk": 8192},
                   {"num_warps": 2, "chunk": 4096}):
            ts = [quest_select.threshold_select(qs[l], nn, 16, m.budget, 1, kq, **tw) for l in sl]
            rec(length=n, variant=f"same_pages threshold {json.dumps(tw)}", same=same(ts))
            timed(n, f"stage select threshold {json.dumps(tw)}", lambda tw=tw: [quest_select.threshold_select(
                qs[l], nn, 16, m.budget, 1, kq, **tw) for l in sl])
        for w in (1, 2):
            kw = {**dflt, "num_warps": w}
            got = [quest_select.quest_select_triton(qs[l], nn, 16, m.budget, 1, kq, **kw) for l in sl]
            rec(length=n, variant=f"same_pages select w{w}", same=same(got))
            timed(n, f"stage select default w{w}", lambda kw=kw: [quest_select.quest_select_triton(
                qs[l], nn, 16, m.budget, 1, kq, **kw) for l in sl])
        # paged attention over the selected rows (32 heads x 4,096 rows of K and V per layer)
        rows = quest.rows_loaded(n)
        attn_gb = len(sl) * HQ * rows * D * 2 * 2 / 1e9
        variants = [("paged merge", paged_decode.paged_attention_triton, {}),
                    ("dot merge s3", paged_dot.paged_dot_triton, {}),
                    ("dot merge s4", paged_dot.paged_dot_triton, {"num_stages": 4}),
                    ("dot merge bp8 pps32", paged_dot.paged_dot_triton, {"block_pages": 8, "pages_per_split": 32}),
                    ("paged merge pps32", paged_decode.paged_attention_triton, {"pages_per_split": 32}),
                    ("paged merge w8 bp8", paged_decode.paged_attention_triton, {"num_warps": 8, "block_pages": 8}),
                    ("dot merge w8 bp8", paged_dot.paged_dot_triton, {"num_warps": 8, "block_pages": 8})]
        for name, fn, tune in variants:
            timed(n, f"stage {name}", lambda fn=fn, tune=tune: [fn(q[l], kv.k[l], kv.v[l], lists[i], nn, 16, D ** -0.5,
                                                                   counter=quest.counter, **tune)
                                                                for i, l in enumerate(sl)], gb=attn_gb)
        del kv, q, quest, qs, lists
        torch.cuda.empty_cache()
    write_report(report, a.out)


def batch(a) -> None:
    """Quest's batched decode (methods/quest_batch.py) vs one request at a time: the 32-layer attention of one step
    for B rows of ``--own`` own tokens over one shared context (the dense layers: the shared-prefix kernel), and
    Quest's single-request step (x B = the sequential attention cost; the weights are read once per step either way
    per row: B times sequentially)."""
    from types import SimpleNamespace

    from scbench.kernels import shared_prefix
    from scbench.kv.offload import TieredLayer
    from scbench.methods.quest_batch import QuestBatch

    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "plan": "batch", "results": []}
    t_start = time.perf_counter()
    for n in a.lengths:
        kv1, q1 = make_kv(n, -(-(n + 64) // 256) * 256)
        quest = QuestDecode(Quest(budget=4096))
        quest.allocate(kv1, None)
        quest.load(kv1, None)
        ms1, _ = time_graph(step_fn(kv1, q1, quest))
        rec = {"length": n, "variant": "single request step", "ms": round(ms1, 4)}
        report["results"].append(rec)
        print(json.dumps(rec), flush=True)
        layers = []
        for l in range(L):
            layer = TieredLayer(kv1.k[l][:, :, :n], kv1.v[l][:, :, :n], storage="device")
            layer.state["quest"] = (quest.kmin[l][:, :, : n // 16].contiguous(), quest.kmax[l][:, :, : n // 16].contiguous()) \
                if l in quest.kmin else (torch.empty(0), torch.empty(0))
            layers.append(layer)
        del kv1, quest
        torch.cuda.empty_cache()
        for b in a.rows:
            if time.perf_counter() - t_start > a.budget_s:
                break
            g = torch.Generator(device="cuda").manual_seed(b)
            own = 64 + a.own
            kv = SimpleNamespace(shared=[(x.keys, x.values) for x in layers],
                                 k=[torch.randn(b, HKV, own, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(L)],
                                 v=[torch.randn(b, HKV, own, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(L)],
                                 at=torch.full((b,), a.own, dtype=torch.long, device="cuda"),
                                 shared_len=torch.full((L, b), n, dtype=torch.long, device="cuda"))
            q = [torch.randn(b, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g) * 2 for _ in range(L)]
            plug = QuestBatch(Quest(budget=4096))
            plug.attach(SimpleNamespace(layers=layers), kv)

            def step():
                outs = []
                for l in range(L):
                    o = plug.attend(kv, l, q[l], kv.k[l], kv.v[l], D ** -0.5)
                    if o is None:
                        o = shared_prefix.shared_prefix_decode(q[l], kv.shared[l][0], kv.shared[l][1], kv.shared_len[l],
                                                               kv.k[l], kv.v[l], kv.at, D ** -0.5)
                    outs.append(o)
                return outs
            try:
                ms, _ = time_graph(step)
            except Exception as e:  # noqa: BLE001
                print(f"n={n} B={b} FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
                continue
            rec = {"length": n, "variant": f"batched step B={b}", "ms": round(ms, 4),
                   "per_row_ms": round(ms / b, 4), "vs_sequential": round(ms1 * b / ms, 3)}
            report["results"].append(rec)
            print(json.dumps(rec), flush=True)
        del layers
        torch.cuda.empty_cache()
    write_report(report, a.out)


RANK = {"num_warps": 4, "chunk": 8192, "rank": True, "margin": 1.25, "cap": 512}


def tune(a) -> None:
    """Round-8 follow-up of ``profile``: whole steps with the matmul paged kernel (now the default) and its sizes,
    the pipelined score kernel, the two select stages apart, and how many pages the threshold select keeps."""
    t_start = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "plan": "tune", "results": []}

    def rec(**kw):
        report["results"].append(kw)
        print(json.dumps(kw), flush=True)

    def timed(n, name, fn, gb=None):
        if time.perf_counter() - t_start > a.budget_s:
            print(f"skip {n} {name}: past --budget-s", flush=True)
            return None
        try:
            ms, outs = time_graph(fn)
        except Exception as e:  # noqa: BLE001
            print(f"n={n} {name} FAILED {type(e).__name__}: {str(e)[:600]}", flush=True)
            return None
        rec(length=n, variant=name, ms=round(ms, 4), **({} if gb is None else {"gb": round(gb, 3),
                                                                                "tb_s": round(gb / ms, 3)}))
        return outs

    for n in a.lengths:
        kv, q = make_kv(n, -(-(n + 64) // 256) * 256)
        quest = QuestDecode(Quest(budget=4096))
        quest.allocate(kv, None)
        quest.load(kv, None)
        m, at, nn = quest.m, kv.at[:1], kv.at[:1] + 1
        sl = list(range(m.dense_layers, L))
        p = quest.kmin[sl[0]].shape[2]
        long = p >= quest.segment_from
        timed(n, "step full", step_fn(kv, q, None))
        ref = timed(n, "step quest default", step_fn(kv, q, quest))
        steps = [("elementwise paged (dot off)", {"dot": False}),
                 ("scores loop 512 s3", {"score_args": {"loop_pages": 512, "stages": 3}}),
                 ("scores loop 256 s2", {"score_args": {"loop_pages": 256, "stages": 2}}),
                 ("dot bp8 pps32", {"tune": {"block_pages": 8, "pages_per_split": 32}}),
                 ("dot s4", {"tune": {"num_stages": 4}}),
                 ("dot pps8", {"tune": {"pages_per_split": 8}}),
                 ("threshold rank", {"threshold": True, "threshold_args": RANK}),
                 ("select w8", {"select_args": {"num_warps": 8}}),
                 ("select w2", {"select_args": {"num_warps": 2}})]
        for name, attrs in steps if long or not a.short else steps[:3]:
            saved = {k: getattr(quest, k) for k in attrs}
            quest.__dict__.update(attrs)
            out = timed(n, f"step quest {name}", step_fn(kv, q, quest))
            quest.__dict__.update(saved)
            if out is not None and ref is not None:
                rec(length=n, variant=f"diff {name}", max_abs=max((x.float() - y.float()).abs().max().item()
                                                                for x, y in zip(out, ref)))
        if not long:
            continue
        qs = {l: quest_scores.quest_scores_triton(q[l], kv.k[l], quest.kmin[l], quest.kmax[l], at, 16, 1, False)
              for l in sl}
        kq = quest.top_k(p)
        s0 = qs[sl[0]][0].double()  # the threshold select's keep count on this layer's rows (fallback: < pick or > cap)
        ok = s0 > float("-inf")
        cnt = ok.sum(-1)
        mean = torch.where(ok, s0, 0).sum(-1) / cnt
        sd = (torch.where(ok, s0, 0).pow(2).sum(-1) / cnt - mean ** 2).clamp(min=0).sqrt()
        for margin in (2.0, 1.25):
            z = torch.distributions.Normal(0, 1).icdf(1 - (margin * kq + 32) / cnt.cpu()).to(s0.device)
            kept = ((s0 >= (mean + z * sd)[:, None]) & ok).sum(-1)
            rec(length=n, variant=f"threshold kept per row, margin {margin} (pick 255)", min=int(kept.min()),
                max=int(kept.max()))
        for name, tw in (("rank", RANK), ("search w4", {"num_warps": 4, "chunk": 8192})):
            timed(n, f"stage select threshold {name}", lambda tw=tw: [quest_select.threshold_select(
                qs[l], nn, 16, m.budget, 1, kq, **tw) for l in sl])
        nseg = -(-p // 1024)
        cv = torch.empty(HQ, nseg, kq, dtype=torch.float32, device="cuda")
        ci = torch.empty(HQ, nseg, kq, dtype=torch.int32, device="cuda")
        out = torch.empty(1, HQ, kq + 1, dtype=torch.int32, device="cuda")
        np_ = 1 << (nseg * kq - 1).bit_length()
        timed(n, "stage select stage1 (segments)", lambda: [quest_select._quest_local_kernel[(HQ, nseg)](
            qs[l], nn, cv, ci, p, kq, m.budget, SEG=1024, KP=256, PAGE=16, RECENT=1, RADIX=2, num_warps=1) for l in sl])
        timed(n, "stage select stage2 (row)", lambda: [quest_select._quest_select_kernel[(HQ,)](
            cv, ci, nn, out, nseg * kq, kq, m.budget, NP=np_, PAGE=16, RECENT=1, RP=2, GATHER=True, RADIX=2, PM=p,
            num_warps=4) for l in sl])
        bounds_gb = len(sl) * 2 * HKV * p * D * 2 / 1e9
        for lp, st in ((512, 3), (256, 2), (1024, 4)):
            timed(n, f"stage scores loop {lp} s{st}", lambda lp=lp, st=st: [quest_scores.quest_scores_triton(
                q[l], kv.k[l], quest.kmin[l], quest.kmax[l], at, 16, 1, False, loop_pages=lp, stages=st) for l in sl],
                  gb=bounds_gb)
        del kv, q, quest, qs
        torch.cuda.empty_cache()
    write_report(report, a.out)


def final(a) -> None:
    """The defaults as they ship: full attention and Quest's step per length (+ the rank-threshold select)."""
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "plan": "final", "results": []}
    for n in a.lengths:
        kv, q = make_kv(n, -(-(n + 64) // 256) * 256)
        quest = QuestDecode(Quest(budget=4096))
        quest.allocate(kv, None)
        quest.load(kv, None)
        runs = [("step full", None, {}), ("step quest default", quest, {}),
                ("step quest threshold rank", quest, {"threshold": True, "threshold_args": RANK})]
        ref = None
        for name, plug, attrs in runs:
            saved = {k: getattr(quest, k) for k in attrs}
            quest.__dict__.update(attrs)
            try:
                ms, out = time_graph(step_fn(kv, q, plug))
            except Exception as e:  # noqa: BLE001
                print(f"n={n} {name} FAILED {type(e).__name__}: {str(e)[-600:]}", flush=True)
                continue
            finally:
                quest.__dict__.update(saved)
            r = {"length": n, "variant": name, "ms": round(ms, 4)}
            if plug is not None and ref is not None:
                r["max_abs_vs_default"] = max((x.float() - y.float()).abs().max().item() for x, y in zip(out, ref))
            ref = out if name == "step quest default" else ref
            report["results"].append(r)
            print(json.dumps(r), flush=True)
        del kv, q, quest
        torch.cuda.empty_cache()
    write_report(report, a.out)

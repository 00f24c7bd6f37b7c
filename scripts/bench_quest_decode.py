"""Per-step attention work of Quest's and RetrievalAttention-device's captured decode plugins, old vs new (CUDA).

    python scripts/bench_quest_decode.py --lengths 32768 131072 [--sweep] --out F.json

Llama-3.1-8B shapes (32 layers, 32 query / 8 KV heads, head dim 128, bf16): random key/value buffers at each
context length, one new query per layer; a step runs every layer's attention as the captured decode step does
(``plugin.attend``; layers a plugin leaves dense, and ``full``, use fastdecode's split-KV kernel). Each variant's
32-layer step is captured in a CUDA graph and replayed; prints ms per step (attention only: the weight GEMMs and the
rest of the step are the same for every method). Variants: ``full``; ``quest`` / ``ra`` with the old selection
(torch.topk) and with the sort-free kernels (scbench/kernels/{topk,quest}_select.py) under several paged-kernel sizes.
Also prints the largest difference between the old and new outputs (bf16). ``--sweep`` adds each stage timed
alone (scores, select, attention) and other kernel sizes.
"""
from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import torch

from scbench.engines.fastdecode import split_kv_decode_attention
from scbench.methods.quest import Quest
from scbench.methods.quest_fast import QuestDecode
from scbench.methods.retrieval_attention import RetrievalAttention
from scbench.methods.retrieval_fast import RetrievalDecode

L, HQ, HKV, D = 32, 32, 8, 128


def make_kv(n: int, cap: int):
    g = torch.Generator(device="cuda").manual_seed(n)
    k = [torch.randn(1, HKV, cap, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(L)]
    v = [torch.randn(1, HKV, cap, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(L)]
    q = [torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g) * 2 for _ in range(L)]
    at = torch.full((L,), n - 1, dtype=torch.long, device="cuda")
    return SimpleNamespace(k=k, v=v, at=at, lengths=[n - 1] * L), q


def step_fn(kv, q, plugin):
    scale = D ** -0.5

    def step():
        outs = []
        for l in range(L):
            o = plugin.attend(kv, l, q[l], kv.k[l], kv.v[l], scale) if plugin is not None else None
            if o is None:
                o = split_kv_decode_attention(q[l], kv.k[l], kv.v[l], kv.at[l : l + 1], scale)
            outs.append(o)
        return outs
    return step


def time_graph(step, reps: int = 20) -> tuple[float, list]:
    step(), step()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / reps, [o.clone() for o in outs if isinstance(o, torch.Tensor)]


def _diff(got, ref) -> float:
    if got is None or ref is None:
        return float("nan")
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(got, ref))


def breakdown(kv, q, quest, ra) -> dict:
    """Step callables of each stage alone (inputs precomputed): where the new paths spend. Quest stages run over
    its selecting layers (30), RetrievalAttention's over all 32."""
    from scbench.kernels import paged_decode, quest_scores, quest_select, topk_select

    m, at, n = quest.m, kv.at[:1], kv.at[:1] + 1
    sl = range(m.dense_layers, L)
    qs = {l: quest_scores.quest_scores_triton(q[l], kv.k[l], quest.kmin[l], quest.kmax[l], at, 16, 1, False) for l in sl}
    kq = quest.top_k(qs[sl[0]].shape[-1])
    qp = {l: quest_select.quest_select_triton(qs[l], n, 16, m.budget, 1, kq) for l in sl}
    rs = [(q[l].reshape(1, HKV, HQ // HKV, D) @ kv.k[l].transpose(-1, -2)).reshape(1, HQ, -1) for l in range(L)]
    rr = [ra.rows(kv, l, q[l]) for l in range(L)]
    each = lambda f, layers=range(L): (lambda: [f(l) for l in layers])  # noqa: E731
    sel = lambda **kw: each(lambda l: quest_select.quest_select_triton(qs[l], n, 16, m.budget, 1, kq, **kw), sl)  # noqa: E731
    out = {
        "quest_scores": each(lambda l: quest_scores.quest_scores_triton(q[l], kv.k[l], quest.kmin[l], quest.kmax[l],
                                                                        at, 16, 1, False), sl),
        "quest_topk_old": each(lambda l: qs[l].topk(kq, dim=-1), sl),
        "quest_attn": each(lambda l: paged_decode.paged_attention_triton(q[l], kv.k[l], kv.v[l], qp[l], n, 16,
                                                                         D ** -0.5, **quest.tune), sl),
        "ra_scores": each(lambda l: (q[l].reshape(1, HKV, HQ // HKV, D) @ kv.k[l].transpose(-1, -2))),
        "ra_select": each(lambda l: topk_select.radix_select_triton(rs[l], n, 4096, 128, 512, static=True,
                                                                    **ra.radix)),
        "ra_topk_old": each(lambda l: rs[l].float().topk(4096, dim=-1)),
        "ra_attn": each(lambda l: paged_decode.paged_attention_triton(q[l], kv.k[l], kv.v[l], rr[l], n, 1, D ** -0.5,
                                                                      **ra.tune)),
    }
    for kw in SELECT_ARGS:
        out["quest_select " + json.dumps(kw)] = sel(**kw)
    return out


SELECT_ARGS = [{}, {"num_warps": 4}, {"num_warps": 32}, {"segment": 1024, "local_warps": 1},
               {"segment": 512, "local_warps": 1}, {"segment": 2048, "local_warps": 4},
               {"segment": 1024, "local_warps": 2, "num_warps": 4}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--sweep", action="store_true", help="also sweep kernel sizes and time each stage alone")
    ap.add_argument("--out")
    a = ap.parse_args()
    ra_tunes = [{"pages_per_split": 256, "block_pages": 64, "num_warps": 8, "rowwise": True},
                {"pages_per_split": 512, "block_pages": 64}]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": []}
    cases = {}
    for n in a.lengths:
        kv, q = make_kv(n, n + 256)
        quest = QuestDecode(Quest(budget=4096))
        quest.allocate(kv, None)
        quest.load(kv, None)
        ra = RetrievalDecode(RetrievalAttention(top_k=4096, n_init=128, n_local=512, tier="device"))
        ra.allocate(kv, None)
        cases[n] = kv, q, quest, ra

    def run(n, name, plugin, tune=None, fn=None):
        kv, q = cases[n][:2]
        try:
            ms, outs = time_graph(fn or step_fn(kv, q, plugin))
        except Exception as e:  # one failing variant must not hide the others
            print(f"n={n:7d} {name:14s} {json.dumps(tune)} FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
            return None
        report["results"].append({"length": n, "variant": name, "tune": tune, "ms": round(ms, 4)})
        print(f"n={n:7d} {name:14s} {json.dumps(tune):64s} {ms:8.3f} ms/step", flush=True)
        return outs

    for n, (kv, q, quest, ra) in cases.items():  # old vs new with the defaults
        run(n, "full", None)
        quest.select = "topk"
        ref = run(n, "quest_old", quest)
        quest.select = "bisect"
        diff = _diff(run(n, "quest_new", quest, quest.tune), ref)
        print(f"  quest new vs old: max |diff| {diff:.4g}", flush=True)
        report["results"].append({"length": n, "variant": "quest_diff", "max_abs": diff})
        ra.select, tune, ra.tune = "topk", ra.tune, {}
        ref = run(n, "ra_old", ra, {})
        ra.select, ra.tune = "radix", tune
        diff = _diff(run(n, "ra_new", ra, ra.tune), ref)
        print(f"  ra new vs old: max |diff| {diff:.4g}", flush=True)
        report["results"].append({"length": n, "variant": "ra_diff", "max_abs": diff})
    for n, (kv, q, quest, ra) in cases.items():  # gqa=group: one list per KV head (the group kernel)
        qg = QuestDecode(Quest(budget=4096, gqa="group"))
        qg.allocate(kv, None)
        qg.load(kv, None)
        qg.select = "topk"
        ref = run(n, "questG_old", qg)
        qg.select = "bisect"
        diff = _diff(run(n, "questG_new", qg, qg.tune), ref)
        print(f"  quest gqa=group new vs old: max |diff| {diff:.4g}", flush=True)
        rg = RetrievalDecode(RetrievalAttention(top_k=4096, n_init=128, n_local=512, gqa="group", tier="device"))
        rg.select, tune, rg.tune = "topk", rg.tune, {"grouped": False}
        ref = run(n, "raG_old", rg, rg.tune)
        rg.select, rg.tune = "radix", tune
        diff = _diff(run(n, "raG_new", rg, rg.tune), ref)
        print(f"  ra gqa=group new vs old: max |diff| {diff:.4g}", flush=True)
        del qg, rg
    for n, (kv, q, quest, ra) in cases.items():  # per-turn work outside the graph: StaticKV.load + plugin.load
        scratch = torch.empty_like(kv.k[0][:, :, : n - 1])
        e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        for l in range(L):
            scratch.copy_(kv.k[l][:, :, : n - 1])  # the same strided traffic as StaticKV.load's copy
            scratch.copy_(kv.v[l][:, :, : n - 1])
        e1.record()
        quest.load(kv, None)
        e2.record()
        torch.cuda.synchronize()
        copy_ms, bounds_ms = e0.elapsed_time(e1), e1.elapsed_time(e2)
        print(f"n={n:7d} per turn: StaticKV.load copy {copy_ms:.2f} ms, Quest bounds load {bounds_ms:.2f} ms", flush=True)
        report["results"].append({"length": n, "variant": "turn_load", "copy_ms": copy_ms, "bounds_ms": bounds_ms})
        del scratch
    for n, (kv, q, quest, ra) in cases.items() if a.sweep else ():
        try:
            for name, fn in breakdown(kv, q, quest, ra).items():
                run(n, name, None, None, fn)
        except Exception as e:
            print(f"breakdown FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
        for t in SELECT_ARGS[3:5]:
            quest.select_args = t
            run(n, "quest_new_sel", quest, t)
        quest.select_args, quest.merge = {}, True
        run(n, "quest_new_merge", quest, {"merge": True})
        quest.select_args = SELECT_ARGS[3]
        run(n, "quest_new_sel_merge", quest, SELECT_ARGS[3])
        quest.select_args, quest.merge, ra.merge = {}, False, True
        run(n, "ra_new_merge", ra, {"merge": True})
        ra.merge = False
        for t in ra_tunes:
            ra.tune = t
            run(n, "ra_new", ra, t)
        ra.tune = RetrievalDecode(ra.m).tune
    write_report(report, a.out)



def write_report(report: dict, out: str | None) -> None:
    """The report as one ``JSON ...`` line on stdout (the GPU queue's log) and, with ``--out``, as a file."""
    print("JSON " + json.dumps(report))
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

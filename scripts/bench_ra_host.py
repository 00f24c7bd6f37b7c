"""RetrievalAttention's host tier on the GPU box: the split decode (methods/retrieval_host.py) against the loading
path (``split=false``) on a Llama-3.1-8B-shaped random bf16 model, plus a CPU microbenchmark of the host half.

    TOK=<tokenizer folder> python scripts/bench_ra_host.py [--ctx 32768] [--new 20] [--old 3] [--micro 131072 32768]

1. ``micro`` (run last): the host half of one layer at the 8B shape (8 KV heads x 128 dims, 32 query heads, top-k 4096) on
   synthetic keys, per step part (inner products, top-k, value gather + weighted sum), on the CPU's threads.
2. ``e2e``: ``random:llama-3.1-8b`` on the GPU, ``--ctx`` random tokens prefilled with RetrievalAttention
   (tier=cpu, top_k=4096), then from the same checkpoint ``--old`` tokens through the loading path and ``--new``
   through the split path (plain ``topk``, then the sampled bound; ``new-half``: search=half): decode tok/s, bus bytes per token (``loaded_bytes``), host seconds per token
   (``load_s``), and how many leading greedy tokens agree (bf16).
3. then ``micro`` at each ``--micro`` length while time is left (``--budget`` seconds in all): at 128K the host
   half alone (an end-to-end 128K run needs ~50 s of prefill and offload, more than the GPU queue's 100 s allow).
One JSON object per line on stdout.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

T0 = time.perf_counter()


def log(**kw) -> None:
    kw["t"] = round(time.perf_counter() - T0, 1)
    print(json.dumps(kw), flush=True)


def timed(fn, rep: int = 5) -> float:
    fn()
    ms = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return round(statistics.median(ms), 3)


def micro_native(n: int, top_k: int = 4096, torch_path: bool = True) -> None:
    """The host half of one layer through the C kernel (scbench/kernels/ra_host.c): bf16 keys read in place (the
    default), float32 keys, gqa=group; and the torch ops path (its reference) on float32 keys."""
    from scbench.kernels import ra_host
    from scbench.methods.retrieval_host import host_partial
    from scbench.methods.retrieval_search import Workspace

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    kb = torch.randn(1, 8, n, 128, generator=g).bfloat16()
    vbuf = torch.randn(1, 8, n, 128, generator=g).bfloat16()
    q = torch.randn(1, 32, 128, generator=g).bfloat16().float()
    lo, hi = 128, n - 512
    ws = Workspace()
    row = {"micro_native": n, "threads": torch.get_num_threads(), "build": ra_host.info(),
           "setup_s": round(time.perf_counter() - t0, 2)}
    if ra_host.available():
        row["native_bf16_ms"] = timed(lambda: host_partial(q, kb, vbuf, lo, hi, top_k, False, 0.088, ws, native=True))
        row["native_bf16_group_ms"] = timed(lambda: host_partial(q, kb, vbuf, lo, hi, top_k, True, 0.088, ws,
                                                                 native=True))
        row["native_bf16_topk16_ms"] = timed(lambda: host_partial(q, kb, vbuf, lo, hi, 16, False, 0.088, ws,
                                                                  native=True))  # ~ the scan alone
        if n <= 32768:  # one core: the scan's per-core speed (memory- or instruction-bound?)
            torch.set_num_threads(1)
            row["native_bf16_topk16_1thr_ms"] = timed(lambda: host_partial(q, kb, vbuf, lo, hi, 16, False, 0.088, ws,
                                                                           native=True), rep=2)
        one = lambda: host_partial(q, kb, vbuf, lo, hi, top_k, False, 0.088, ws, native=True)  # noqa: E731
        ra_host.tune(sampled=False)  # the select of round 7 (radix over every score)
        row["native_bf16_radix_select_ms"] = timed(one)
        for ahead in (0, 16, 64):  # the scan's software prefetch distance (rows; default 32)
            ra_host.tune(ahead=ahead)
            row[f"native_bf16_ahead{ahead}_ms"] = timed(one)
        ra_host.tune()
        row["select_counts"] = ra_host.counts()
        for ahead, l2 in ((32, 0), (64, 0), (32, 1), (64, 1), (128, 1)):  # the scan alone (top-k 16) at other
            ra_host.tune(ahead=ahead, l2=bool(l2))  # prefetch distances (rows), into L1 or L2
            row[f"native_bf16_topk16_ahead{ahead}{'_l2' if l2 else ''}_ms"] = timed(lambda: host_partial(q, kb, vbuf, lo, hi, 16, False,
                                                                                     0.088, ws, native=True))
        ra_host.tune()
        # what the box's cores stream through other code: oneDNN's bf16 products over the same keys, a max reduction
        qb4 = q.bfloat16().view(1, 8, 4, 128)
        row["torch_bf16_matmul_ms"] = timed(lambda: qb4 @ kb[:, :, lo:hi].transpose(-1, -2))
        row["torch_amax_ms"] = timed(lambda: kb.amax())
        row["key_mb"] = round(kb[:, :, lo:hi].numel() * 2 / 1e6, 1)
        for t in ((8, 12) if n <= 32768 else ()):
            torch.set_num_threads(t)
            row[f"native_bf16_{t}thr_ms"] = timed(lambda: host_partial(q, kb, vbuf, lo, hi, top_k, False, 0.088, ws,
                                                                       native=True))
        torch.set_num_threads(row["threads"])
    if torch_path:
        keys = kb.float()
        row["native_f32_ms"] = timed(lambda: host_partial(q, keys, vbuf, lo, hi, top_k, False, 0.088, ws, native=True))
        row["torch_f32_ms"] = timed(lambda: host_partial(q, keys, vbuf, lo, hi, top_k, False, 0.088, ws,
                                                         native=False), rep=3)
        a = host_partial(q, keys, vbuf, lo, hi, top_k, False, 0.088, ws, native=False)
        b = host_partial(q, kb, vbuf, lo, hi, top_k, False, 0.088, ws, native=True)
        row["native_vs_torch_max_abs"] = [round((a[0] - b[0]).abs().max().item(), 6),
                                          round((a[1] - b[1]).abs().max().item(), 6)]
    log(**row)


def micro(n: int, top_k: int = 4096, profile: bool = True, half: bool = False) -> None:
    from scbench.methods.retrieval_host import host_partial
    from scbench.methods.retrieval_search import Workspace, half_search, topk_rows

    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 8, n, 128, generator=g)
    vbuf = torch.randn(1, 8, n, 128, generator=g).bfloat16()
    q = torch.randn(1, 32, 128, generator=g)
    lo, hi = 128, n - 512
    s = q.view(1, 8, 4, 128) @ keys[..., lo:hi, :].transpose(-1, -2)
    idx = topk_rows(s, top_k)
    flat = vbuf.view(-1, 128)
    gi = (idx + lo + (torch.arange(8) * n).view(1, 8, 1, 1)).reshape(-1)
    vals = flat.index_select(0, gi)
    p = torch.rand(1, 8, 4, top_k)
    ws = Workspace()
    row = {"micro": n, "threads": torch.get_num_threads(),
           "read_f32_GBps": round(keys.numel() * 4 / timed(keys.sum) / 1e6, 1),
           "scores_qk_ms": timed(lambda: q.view(1, 8, 4, 128) @ keys[..., lo:hi, :].transpose(-1, -2)),
           "scores_kq_ms": timed(lambda: (keys[..., lo:hi, :] @ q.view(1, 8, 4, 128).transpose(-1, -2))
                                 .transpose(-1, -2).contiguous()),
           "topk_ms": timed(lambda: s.topk(top_k, dim=-1, sorted=False)),
           "topk_rows_ms": timed(lambda: topk_rows(s, top_k)),
           "gather_v_ms": timed(lambda: flat.index_select(0, gi)),
           "pv_f32_ms": timed(lambda: p.unsqueeze(-2) @ vals.float().view(1, 8, 4, top_k, 128)),
           "pv_bf16_ms": timed(lambda: p.bfloat16().unsqueeze(-2) @ vals.view(1, 8, 4, top_k, 128)),
           "host_partial_ms": timed(lambda: host_partial(q, keys, vbuf, lo, hi, top_k, False, 0.088, ws)),
           "host_partial_no_ws_ms": timed(lambda: host_partial(q, keys, vbuf, lo, hi, top_k, False, 0.088)),
           "host_partial_group_ms": timed(lambda: host_partial(q, keys, vbuf, lo, hi, top_k, True, 0.088, ws))}
    for c in (2, 4):  # the products as 8 * c batches (one per thread?) instead of 8
        mc = (hi - lo) // c
        kc = keys[..., lo:lo + mc * c, :].reshape(8 * c, mc, 128)
        qc = q.view(8, 1, 4, 128).expand(8, c, 4, 128).reshape(8 * c, 4, 128).transpose(1, 2)
        row[f"scores_kq_{8 * c}batch_ms"] = timed(lambda: torch.bmm(kc, qc))
    from scbench.methods import retrieval_search

    retrieval_search.BOUND = True
    row["topk_bound_ms"] = timed(lambda: topk_rows(s, top_k))
    row["host_partial_bound_ms"] = timed(lambda: host_partial(q, keys, vbuf, lo, hi, top_k, False, 0.088, ws))
    retrieval_search.BOUND = False
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        with prof(activities=[ProfilerActivity.CPU]) as p:
            host_partial(q, keys, vbuf, lo, hi, top_k, False, 0.088, ws)
        ops = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
        row["profile_ms"] = {e.key: round(e.self_cpu_time_total / 1e3, 3) for e in ops}
    kb, qb = keys.bfloat16(), q.bfloat16().float()
    row["scores_bf16_mm_ms"] = timed(lambda: [torch.mm(qb.bfloat16().view(8, 4, 128)[g], kb[0, g, lo:hi].T)
                                              for g in range(8)])
    if half:
        row["half_search_ms"] = timed(lambda: half_search(qb, kb, lo, hi, top_k, False, ws))
        row["host_partial_half_ms"] = timed(lambda: host_partial(qb, kb, vbuf, lo, hi, top_k, False, 0.088, ws))
    threads = torch.get_num_threads()
    if half and threads > 8:
        torch.set_num_threads(threads // 2)
        row[f"host_partial_ms_{threads // 2}thr"] = timed(
            lambda: host_partial(q, keys, vbuf, lo, hi, top_k, False, 0.088, ws))
        row[f"host_partial_half_ms_{threads // 2}thr"] = timed(
            lambda: host_partial(qb, kb, vbuf, lo, hi, top_k, False, 0.088, ws))
        torch.set_num_threads(threads)
    log(**row)


RUNS = {"old": (False, "float32", False), "new": (True, "float32", False), "new-bound": (True, "float32", True),
        "new-half": (True, "half", False), "torch": (True, "float32", False)}
"""Decode paths: (split, search, retrieval_search.BOUND); 'new' takes the C host kernel when it runs (the default),
'torch' the torch ops host half (SCBENCH_RA_NATIVE=0 for that run)."""


def e2e(engine, n: int, runs: list[tuple[str, int]], top_k: int, budget: float) -> None:
    """Prefill ``n`` tokens once, then each (path, tokens) of ``runs`` from the same checkpoint (while time is left)."""
    from scbench.kv.offload import tiered_layers
    from scbench.methods import retrieval_search
    from scbench.methods.retrieval_attention import RetrievalAttention

    torch.cuda.empty_cache()
    m = RetrievalAttention(top_k=top_k, search=RUNS[runs[0][0]][1])
    retrieval_search.BOUND = False
    s = engine.session(m)
    ids = torch.randint(100, 40000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    fs = s.feed(ids, compress=True, sparse=False)
    mem = s.memory()
    log(ctx=n, prefill_s=round(fs.seconds - fs.compress_s, 2), compress_s=round(fs.compress_s, 2),
        slow_tier_GB=round(mem.get("slow_tier_bytes", 0) / 1e9, 2), kv_gpu_MB=round(mem.get("kv_bytes", 0) / 1e6, 1))
    logits, ckpt = s.last_logits, s.checkpoint(rewrites=False)
    out = {}
    for name, tokens in runs:
        if time.perf_counter() - T0 > budget - 4 - tokens * (3 if name == "old" else 0.15) * n / 32768:
            log(ctx=n, path=name, skipped="time")
            continue
        m.split, m.search, retrieval_search.BOUND = RUNS[name]
        os.environ["SCBENCH_RA_NATIVE"] = "0" if name in ("torch", "old") else "1"
        copy = name != "old" and m.search == "float32" and not m.reads_stored_keys(tiered_layers(s.cache)[0])
        if copy:  # the float32 copy exists before the timed steps
            t0 = time.perf_counter()
            for layer in tiered_layers(s.cache):
                m.search_keys(layer)
            log(ctx=n, float32_copy_s=round(time.perf_counter() - t0, 2))
        s.memory()
        gen = s.generate(tokens)
        mem = s.memory()
        steps = len(gen.tokens) - 1
        out[name] = gen.tokens
        log(ctx=n, path=name, tokens=len(gen.tokens), decode_s=round(gen.decode_s, 3),
            tok_s=round(steps / gen.decode_s, 3) if steps else None,
            bus_bytes_per_token=round(mem["loaded_bytes"] / max(1, steps)),
            host_s_per_token=round(mem["load_s"] / max(1, steps), 4),
            slow_tier_GB=round(mem.get("slow_tier_bytes", 0) / 1e9, 2))
        s.rollback(ckpt)
        s.last_logits = logits
    for x, y in (("old", "new"), ("new", "new-bound"), ("new", "new-half"), ("old", "new-half"), ("torch", "new")):
        if x in out and y in out:
            a, b = out[x], out[y]
            k = min(len(a), len(b))
            log(ctx=n, pair=f"{x}/{y}", same_leading_tokens=next((i for i in range(k) if a[i] != b[i]), k), compared=k)
    del s, m
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--new", type=int, default=20)
    ap.add_argument("--old", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=4096)
    ap.add_argument("--budget", type=float, default=95.0)
    ap.add_argument("--micro", type=int, nargs="*", default=[131072, 32768])
    ap.add_argument("--native-micro", type=int, nargs="*", default=[],
                    help="after e2e: the C host kernel's micro at these lengths (micro_native)")
    ap.add_argument("--runs", nargs="*", default=["old", "new", "new-bound"],
                    help="e2e decode paths (RUNS; 'torch': the split with the torch ops host half)")
    args = ap.parse_args()
    log(torch=torch.__version__, threads=torch.get_num_threads(), cuda=torch.cuda.is_available(),
        cpu=next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"))
    if torch.cuda.is_available() and args.runs:
        from scbench.engines.hf import HFEngine

        engine = HFEngine("random:llama-3.1-8b", tokenizer_path=os.environ.get("TOK"), device="cuda",
                          dtype="bfloat16")
        log(model_built=True)
        e2e(engine, args.ctx, [(r, args.old if r == "old" else args.new) for r in args.runs], args.top_k,
            args.budget)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    for n in args.native_micro:  # the C host kernel alone (no model), while time is left
        if time.perf_counter() - T0 < args.budget - (6 if n > 65536 else 3):
            micro_native(n, args.top_k, torch_path=n <= 32768)
    for n in args.micro:  # the host half alone (no model), while time is left
        if time.perf_counter() - T0 < args.budget - (25 if n > 65536 else 8):
            micro(n, args.top_k)

if __name__ == "__main__":
    main()

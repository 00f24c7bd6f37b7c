"""Batched decode over a ragged context layer on the GPU (scbench/kernels/ragged_shared.py) against the sequential
path's ragged kernel (scbench/kernels/ragged_decode.py, one request at a time).

    python scripts/bench_ragged_shared.py [--lengths 32768 131072] [--batches 1 2 4 8] [--budget 40] [--out F.json]
        [--layers 4 --steps 20 --step-cache duo|adakv] [--skip-kernels] [--skip-steps]

One layer of Llama-3.1-8B's shape (32 query / 8 KV heads, head dim 128, bf16), per context length n two caches:
AdaKV-like (4,096 tokens per head on average, spread +-50 %) and DuoAttention-like (half the heads hold the whole
context, half 4,096). A batch of B requests, each with 256 own keys (150 valid): the batched kernel (one launch pair
for the batch) vs B calls of the single-request kernel over the same prefix plus that request's own keys (what each
request of the sequential path reads per step). Each timed as 8 calls captured in a CUDA graph, replayed 3 times.
Bytes: the prefix keys + values (read once per batch step by the batched kernel, B times sequentially). Also the max
|diff| of the batched kernel against the torch path (float32 products) per case. Then the whole step (``steps``:
the sequential FastDecoder + ragged plugin vs the batched BatchStep, both CUDA graphs, on a random 8B-shaped model of
``--layers`` layers, projected to 32). Prints one line per measurement and a JSON line at the end (and --out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shared_prefix import timed  # noqa: E402

HQ, HKV, D = 32, 8, 128


def caches(n: int, gen, hkv: int = HKV) -> dict[str, list[int]]:
    ada = (torch.rand(hkv, generator=gen) + 0.5) * min(4096, n)
    ada = [max(1, int(x)) for x in ada * (hkv * min(4096, n) / ada.sum())]
    return {"adakv": ada, "duo": [n if h % 2 == 0 else min(4096, n) for h in range(hkv)]}


SWEEP = [(64, 4, 2, 16), (64, 8, 2, 16), (32, 4, 2, 16), (32, 4, 3, 16), (64, 4, 1, 16), (128, 8, 1, 16),
         (64, 4, 2, 32), (32, 2, 3, 16)]
"""``--sweep``: (keys per block, num_warps, num_stages, rows per tile); the first is the default at bf16 D=128."""


def sweep(a, out: list) -> None:
    """The batched kernel's knobs on the Duo-like cache at the first length, for each batch size (``SWEEP``)."""
    from scbench.kernels import ragged_shared as rs

    dev, bf = torch.device("cuda"), torch.bfloat16
    t0 = time.perf_counter()
    n = a.lengths[0]
    lengths = caches(n, torch.Generator().manual_seed(0))["duo"]
    pk, pv = (torch.randn(sum(lengths), D, device=dev, dtype=bf) for _ in range(2))
    off, lens = torch.tensor(rs.offsets_of(lengths), device=dev), torch.tensor(lengths, device=dev)
    suf = torch.empty(1, HKV, 0, D, device=dev, dtype=bf)
    nbytes = 2 * pk.numel() * pk.element_size()
    for b in a.batches:
        q = torch.randn(b, HQ, 1, D, device=dev, dtype=bf)
        ok, ov = (torch.randn(b, HKV, a.own, D, device=dev, dtype=bf) for _ in range(2))
        sl, oat = torch.zeros(b, dtype=torch.long, device=dev), torch.full((b,), 149, device=dev)
        for bn, warps, stages, rows in SWEEP:
            if time.perf_counter() - t0 > a.sweep_budget:
                print("sweep budget reached", flush=True)
                return
            rq = rs.tiling(b, HQ // HKV, rows)[2]
            for split in (None, 2048):
                work = rs.SharedWork(lengths, 0, rq, dev, split=split)
                kw = dict(bn=bn, num_warps=warps, num_stages=stages, rows=rows)
                try:
                    t = timed(lambda: rs.ragged_shared_decode(q, pk, pv, off, lens, suf, suf, sl, ok, ov, oat, work,
                                                              **kw))
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: the next config
                    print(f"sweep B={b} {kw}: {type(e).__name__}", flush=True)
                    continue
                out.append({"n": n, "batch": b, **kw, "split": work.split, "items": work.n, "us": t * 1e6,
                            "tbps": nbytes / t / 1e12})
                print(f"sweep n={n} duo B={b} bn={bn} warps={warps} stages={stages} rows={rows} split={work.split} "
                      f"({work.n} items): {t * 1e6:.1f} us ({nbytes / t / 1e12:.2f} TB/s)", flush=True)


def steps(a, t0, out: list) -> None:
    """The whole decode step on a random Llama-3.1-8B-shaped bf16 model with ``--layers`` layers over a ragged cache
    (every layer ragged, ``--step-cache``): FastDecoder with the ragged plugin (the sequential path, one request,
    CUDA graph) against BatchStep over SharedPrefixKV (the batched path, CUDA graph), projected to 32 layers as
    scripts/bench_shared_prefix.py does (LM head + 32 x (step - head) / layers)."""
    from transformers import DynamicCache

    from scbench.batch import Row
    from scbench.batch_step import BatchStep, SharedPrefixKV
    from scbench.engines import attention, fastdecode
    from scbench.engines.models import RANDOM_PRESETS, random_model
    from scbench.kv.ragged import RaggedLayer
    from scbench.methods.ragged_fast import RaggedDecode

    cuda = not a.cpu_check
    dev, bf = torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    hkv, d = (HKV, D) if cuda else (2, 16)
    tb = time.perf_counter()
    preset = RANDOM_PRESETS["llama-3.1-8b" if cuda else "tiny-llama"]
    model = random_model({**preset, "num_hidden_layers": a.layers}, dtype=bf, device=dev)
    attention.register()
    model.set_attn_implementation(attention.NAME)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    print(f"model with {a.layers} layers built in {time.perf_counter() - tb:.1f} s", flush=True)
    gen, nsteps, own_n = torch.Generator().manual_seed(1), a.steps + 4, 40

    def replay(fn, reps):
        if not cuda:  # --cpu-check: one eager step, no timing that means anything
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        for _ in range(reps):
            fn()
        ev[1].record()
        torch.cuda.synchronize()
        return ev[0].elapsed_time(ev[1]) / 1000 / reps

    h = torch.randn(max(a.batches), 1, model.config.hidden_size, device=dev, dtype=bf)
    head = {b: (timed if cuda else lambda fn: replay(fn, 1))(lambda b=b: model.lm_head(model.model.norm(h[:b])).argmax(-1))
            for b in {1, *a.batches}}
    proj = lambda t, b: head[b] + 32 * (t - head[b]) / a.layers  # noqa: E731
    for n in a.lengths:
        lengths = caches(n, gen, hkv)[a.step_cache]
        cache = DynamicCache()
        for li in range(a.layers):
            cache.update(torch.zeros(1, hkv, 1, d, device=dev, dtype=bf), torch.zeros(1, hkv, 1, d, device=dev, dtype=bf),
                         li)
            cache.layers[li] = RaggedLayer([torch.randn(m, d, device=dev, dtype=bf) for m in lengths],
                                           [torch.randn(m, d, device=dev, dtype=bf) for m in lengths])
        fd = fastdecode.FastDecoder(model, dev, plugin=RaggedDecode(None))
        fd._prepare(cache, nsteps)
        fd.tok.fill_(1)
        fd.pos.fill_(n)
        if cuda:
            fd._capture()
        seq = replay(fd.graph.replay if fd.graph is not None else fd._step, a.steps)
        fd = None
        rec = {"n": n, "cache": a.step_cache, "layers": a.layers, "sequential_step_ms": seq * 1e3,
               "sequential_tok_s_32": 1 / proj(seq, 1), "batched": []}
        print(f"step n={n} {a.step_cache}: sequential (FastDecoder + ragged plugin) {seq * 1e3:.2f} ms ({a.layers} "
              f"layers), projected 32 layers {proj(seq, 1) * 1e3:.2f} ms = {1 / proj(seq, 1):.1f} tok/s", flush=True)
        for b in a.batches:
            if time.perf_counter() - t0 > a.step_budget:
                print("step budget reached", flush=True)
                break
            rows = [Row(i, None, None, None, n + own_n, [max(lengths)] * a.layers,
                        [(torch.randn(1, hkv, own_n, d, device=dev, dtype=bf),
                          torch.randn(1, hkv, own_n, d, device=dev, dtype=bf)) for _ in range(a.layers)], n + own_n)
                    for i in range(b)]
            kv = SharedPrefixKV(cache, rows, nsteps, kernel="triton" if cuda else "torch")
            st = BatchStep(model, kv, [1] * b, [n + own_n] * b, nsteps)
            st.capture() if cuda else st()
            sync()
            t = replay(st, a.steps)
            p32 = proj(t, b)
            rec["batched"].append({"batch": b, "step_ms": t * 1e3, "step_32_ms": p32 * 1e3,
                                   "per_request_tok_s_32": b / p32, "vs_sequential": b / p32 * proj(seq, 1)})
            print(f"step n={n} {a.step_cache} B={b}: batched {t * 1e3:.2f} ms ({a.layers} layers), projected 32 layers "
                  f"{p32 * 1e3:.2f} ms = {b / p32:.1f} tok/s per request ({b / p32 * proj(seq, 1):.2f}x sequential)",
                  flush=True)
            del kv, st
        out.append(rec)
        del cache


def main() -> None:
    from scbench.kernels import ragged_decode as rd
    from scbench.kernels import ragged_shared as rs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[131072, 32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--own", type=int, default=256)
    ap.add_argument("--budget", type=float, default=40.0, help="seconds: no new measurement after this")
    ap.add_argument("--out", default=None)
    ap.add_argument("--layers", type=int, default=4, help="layers of the random 8B-shaped model (step part)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--step-budget", type=float, default=30.0, help="seconds for the step part (after the kernels)")
    ap.add_argument("--step-cache", default="duo", choices=["duo", "adakv"])
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="the kernel's knobs on the Duo-like cache (SWEEP)")
    ap.add_argument("--sweep-budget", type=float, default=20.0)
    ap.add_argument("--cpu-check", action="store_true", help="the step part on the tiny model on the CPU (no timing)")
    a = ap.parse_args()
    if a.cpu_check:
        a.skip_kernels = True
    dev, bf = torch.device("cuda"), torch.bfloat16
    name = "cpu" if a.cpu_check else torch.cuda.get_device_name()
    print(name, torch.__version__, flush=True)
    gen = torch.Generator().manual_seed(0)
    t0, rows = time.perf_counter(), []
    for n in a.lengths if not a.skip_kernels else []:
        for kind, lengths in caches(n, gen).items():
            total = sum(lengths)
            pk, pv = (torch.randn(total, D, device=dev, dtype=bf) for _ in range(2))
            off = torch.tensor(rs.offsets_of(lengths), device=dev)
            lens = torch.tensor(lengths, device=dev)
            nbytes = 2 * pk.numel() * pk.element_size()
            suf = torch.empty(1, HKV, 0, D, device=dev, dtype=bf)
            # sequential: one request, its own keys as the ragged kernel's suffix buffer
            q1 = torch.randn(1, HQ, 1, D, device=dev, dtype=bf)
            k1, v1 = (torch.randn(1, HKV, a.own, D, device=dev, dtype=bf) for _ in range(2))
            at1 = torch.tensor([149], device=dev)
            work1 = rd.WorkList(lengths, a.own, dev)
            one = timed(lambda: rd.ragged_decode_triton(q1, pk, pv, off, lens, work1, k1, v1, at1))
            print(f"n={n} {kind} ({total / HKV:.0f} tokens per head on average, {nbytes / 2**20:.0f} MiB): one "
                  f"request {one * 1e6:.1f} us ({nbytes / one / 1e12:.2f} TB/s)", flush=True)
            for b in a.batches:
                if time.perf_counter() - t0 > a.budget:
                    print("budget reached", flush=True)
                    break
                q = torch.randn(b, HQ, 1, D, device=dev, dtype=bf)
                ok, ov = (torch.randn(b, HKV, a.own, D, device=dev, dtype=bf) for _ in range(2))
                sl, oat = torch.zeros(b, dtype=torch.long, device=dev), torch.full((b,), 149, device=dev)
                work = rs.SharedWork(lengths, 0, rs.tiling(b, HQ // HKV)[2], dev)
                fn = lambda: rs.ragged_shared_decode(q, pk, pv, off, lens, suf, suf, sl, ok, ov, oat, work)  # noqa: E731
                bat = timed(fn)
                err = (fn().float() - rs.ragged_shared_attention(q, pk, pv, lengths, suf, suf, sl, ok, ov, oat)
                       .float()).abs().max().item()
                row = {"n": n, "cache": kind, "batch": b, "tokens": total, "batched_us": bat * 1e6,
                       "one_request_us": one * 1e6, "sequential_us": b * one * 1e6, "speedup": b * one / bat,
                       "batched_tbps": nbytes / bat / 1e12, "work_items": work.n, "max_abs_diff": err}
                rows.append(row)
                print(f"n={n} {kind} B={b}: batched {bat * 1e6:.1f} us ({row['batched_tbps']:.2f} TB/s), sequential "
                      f"{b * one * 1e6:.1f} us: {row['speedup']:.2f}x; {work.n} work items; max |diff| vs torch "
                      f"{err:.1e}", flush=True)
            del pk, pv
    sweep_rows: list = []
    if a.sweep:
        sweep(a, sweep_rows)
    step_rows: list = []
    if not a.skip_steps:
        try:
            steps(a, time.perf_counter(), step_rows)
        except Exception as e:  # noqa: BLE001 - keep the kernel numbers
            print(f"step part failed: {type(e).__name__}: {e}", flush=True)
    out = {"device": name, "torch": torch.__version__, "rows": rows, "sweep": sweep_rows, "step": step_rows}
    print(json.dumps(out))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

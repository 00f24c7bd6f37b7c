"""Batched decode over one shared context on the GPU: the shared-prefix kernel and the batched step.

    python scripts/bench_shared_prefix.py --lengths 32768 131072 --batches 1 2 4 8 --layers 8 --budget 50 --out F.json

1. Kernel (one layer of Llama-3.1-8B shape: 32 query / 8 KV heads, head dim 128, bf16): B requests x one token over
   one shared context of n tokens plus 256 own keys each (``--own``, 150 valid): the Triton shared-prefix kernel
   (scbench/kernels/shared_prefix.py), batch.py's torch path (``shared_prefix_attention``, float32 products), and
   the single-request split-KV kernel of FastDecoder (fastdecode.split_kv_decode_attention) for one request; the
   sequential equivalent of a batch is B times that. Each timed as 8 calls captured in a CUDA graph.
2. Step (a random Llama-3.1-8B-shaped bf16 model with ``--layers`` layers, a random context cache of n tokens):
   the batched step (scbench/batch_step.py: SharedPrefixKV + BatchStep, fused forwards, CUDA graph) with the
   Triton kernel and with the torch path, against FastDecoder's single-request step (the sequential path). Each
   captured once, then ``--steps`` replays timed. Also the LM head + pick alone, to project a 32-layer step:
   head + 32 x (step - head) / layers. Per-request rate = B / step time.
Prints as it goes; stops starting new measurements once ``--budget`` seconds have gone.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

DEV = torch.device("cuda")
HQ, HKV, D = 32, 8, 128
PRESET = {"preset": "llama-3.1-8b"}


def timed(fn, reps=8):
    """Seconds per call of ``fn``: ``reps`` calls captured in one CUDA graph, replayed 3 times."""
    if DEV.type != "cuda":  # --cpu-check: run it once
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(3):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1000 / 3 / reps


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def kernels(a, t0, out):
    from scbench.batch_step import shared_prefix_attention
    from scbench.engines import fastdecode
    from scbench.kernels import shared_prefix

    for n in a.lengths:
        sk, sv = (torch.randn(1, HKV, n, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
        kv_bytes = 2 * sk.numel() * 2
        k1, v1 = (torch.randn(1, HKV, n + 256, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
        q1 = torch.randn(1, HQ, 1, D, device=DEV, dtype=torch.bfloat16)
        at1 = torch.tensor([n - 1], device=DEV)
        single = timed(lambda: fastdecode.split_kv_decode_attention(q1, k1, v1, at1))
        print(f"kernel n={n} split-KV one request: {single * 1e6:.1f} us ({kv_bytes / single / 1e12:.2f} TB/s)",
              flush=True)
        for b in a.batches:
            if time.perf_counter() - t0 > a.budget:
                print("budget reached", flush=True)
                return
            q = torch.randn(b, HQ, 1, D, device=DEV, dtype=torch.bfloat16)
            ok, ov = (torch.randn(b, HKV, a.own, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
            sl = torch.full((b,), n, device=DEV)
            oat = torch.full((b,), 149, device=DEV)
            tri = timed(lambda: shared_prefix.shared_prefix_decode(q, sk, sv, sl, ok, ov, oat))
            ref = timed(lambda: shared_prefix_attention(q, sk, sv, sl, ok, ov, oat, None, False), reps=2)
            err = (shared_prefix.shared_prefix_decode(q, sk, sv, sl, ok, ov, oat).float()
                   - shared_prefix_attention(q, sk, sv, sl, ok, ov, oat, None, False).float()).abs().max().item()
            row = {"n": n, "batch": b, "triton_us": tri * 1e6, "torch_us": ref * 1e6, "split_kv_one_us": single * 1e6,
                   "sequential_us": b * single * 1e6, "triton_tbps": kv_bytes / tri / 1e12, "max_abs_diff": err}
            out["kernel"].append(row)
            print(f"kernel n={n} B={b}: triton {tri * 1e6:.1f} us ({row['triton_tbps']:.2f} TB/s), torch "
                  f"{ref * 1e6:.1f} us, sequential split-KV {b * single * 1e6:.1f} us; speedup vs torch "
                  f"{ref / tri:.1f}x, vs sequential {b * single / tri:.2f}x; max |diff| {err:.2e}", flush=True)
        del sk, sv, k1, v1


SWEEP = [(64, 4, 2, 32, 64), (64, 8, 2, 32, 64), (32, 4, 2, 32, 64), (32, 4, 3, 32, 64), (64, 4, 3, 32, 64),
         (64, 4, 2, 16, 64), (128, 8, 2, 32, 64), (64, 4, 2, 32, 128), (32, 4, 2, 32, 128), (64, 8, 2, 32, 128)]
"""Configs of ``--sweep``: (keys per block, num_warps, num_stages, rows per tile, max splits per head); the first is
the default (shared_prefix.CONFIG)."""


def sweep(a, t0, out):
    """The kernel's knobs (``SWEEP``) at each length for the largest batch, slowest case first."""
    from scbench.kernels import shared_prefix

    b = max(a.batches)
    for n in sorted(a.lengths):
        sk, sv = (torch.randn(1, HKV, n, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
        q = torch.randn(b, HQ, 1, D, device=DEV, dtype=torch.bfloat16)
        ok, ov = (torch.randn(b, HKV, a.own, D, device=DEV, dtype=torch.bfloat16) for _ in range(2))
        sl, oat = torch.full((b,), n, device=DEV), torch.full((b,), 149, device=DEV)
        for bn, warps, stages, rows, max_splits in SWEEP:
            if time.perf_counter() - t0 > a.budget:
                print("budget reached", flush=True)
                return
            kw = dict(bn=bn, launch={"num_warps": warps, "num_stages": stages}, rows=rows,
                      split=max(256, -(-n // max_splits // bn) * bn))
            try:
                t = timed(lambda: shared_prefix.shared_prefix_decode(q, sk, sv, sl, ok, ov, oat, **kw))
            except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: the next config
                print(f"sweep n={n} B={b} {kw}: {type(e).__name__}", flush=True)
                continue
            out["sweep"].append({"n": n, "batch": b, **kw, "max_splits": max_splits, "us": t * 1e6,
                                 "tbps": 4 * sk.numel() / t / 1e12})
            print(f"sweep n={n} B={b} bn={bn} warps={warps} stages={stages} rows={rows} split={kw['split']}: "
                  f"{t * 1e6:.1f} us ({4 * sk.numel() / t / 1e12:.2f} TB/s)", flush=True)


def steps(a, t0, out):
    from transformers import DynamicCache

    from scbench.batch import Row
    from scbench.batch_step import BatchStep, SharedPrefixKV
    from scbench.engines import attention, fastdecode
    from scbench.engines.models import RANDOM_PRESETS, random_model

    tb = time.perf_counter()
    dtype = torch.bfloat16 if DEV.type == "cuda" else torch.float32
    model = random_model({**RANDOM_PRESETS[PRESET["preset"]], "num_hidden_layers": a.layers}, dtype=dtype, device=DEV)
    attention.register()  # as HFEngine does: scbench's attention function (the static caches' attend)
    model.set_attn_implementation(attention.NAME)
    sync()
    print(f"model with {a.layers} layers built in {time.perf_counter() - tb:.1f} s", flush=True)
    own_n, nsteps = 40, a.steps + 4

    def replay_time(graph_step, reps):
        if DEV.type != "cuda":
            return timed(graph_step)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        for _ in range(reps):
            graph_step()
        ev[1].record()
        torch.cuda.synchronize()
        return ev[0].elapsed_time(ev[1]) / 1000 / reps

    h = torch.randn(max(a.batches), 1, model.config.hidden_size, device=DEV, dtype=dtype)
    head = {b: timed(lambda b=b: model.lm_head(model.model.norm(h[:b])).argmax(-1)) for b in {1, *a.batches}}
    for n in sorted(a.lengths, reverse=True):
        cache = DynamicCache()
        for li in range(a.layers):
            cache.update(*(torch.randn(1, HKV, n, D, device=DEV, dtype=dtype) for _ in range(2)), li)
        kv_bytes_32 = 32 * 2 * HKV * D * 2 * n
        bound = (16.06e9 + kv_bytes_32) / 4.2e12
        fd = fastdecode.FastDecoder(model, DEV)
        fd._prepare(cache, nsteps)
        fd.tok.fill_(1)
        fd.pos.fill_(n)
        if DEV.type == "cuda":
            fd._capture()
        seq = replay_time(fd.graph.replay if fd.graph is not None else fd._step, a.steps)
        fd = None
        proj = lambda t, b: head[b] + 32 * (t - head[b]) / a.layers  # noqa: E731
        rec = {"n": n, "layers": a.layers, "sequential_step_ms": seq * 1e3, "head_ms": {b: head[b] * 1e3 for b in head},
               "sequential_step_32_ms": proj(seq, 1) * 1e3, "bound_32_ms": bound * 1e3, "batched": []}
        print(f"step n={n}: sequential (FastDecoder, 1 request) {seq * 1e3:.2f} ms ({a.layers} layers), "
              f"projected 32 layers {proj(seq, 1) * 1e3:.2f} ms = {1 / proj(seq, 1):.1f} tok/s; "
              f"bound {bound * 1e3:.2f} ms", flush=True)
        for b in a.batches:
            for kernel in ("triton", "torch"):
                if time.perf_counter() - t0 > a.budget:
                    print("budget reached", flush=True)
                    out["step"].append(rec)
                    return
                rows = [Row(i, None, None, None, n + own_n, [n] * a.layers,
                            [(torch.randn(1, HKV, own_n, D, device=DEV, dtype=dtype),
                              torch.randn(1, HKV, own_n, D, device=DEV, dtype=dtype))
                             for _ in range(a.layers)], n + own_n) for i in range(b)]
                kv = SharedPrefixKV(cache, rows, nsteps, kernel=kernel)
                st = BatchStep(model, kv, [1] * b, [n + own_n] * b, nsteps)
                tc = time.perf_counter()
                st.capture() if DEV.type == "cuda" else st()
                sync()
                cap = time.perf_counter() - tc
                t = replay_time(st, a.steps if kernel == "triton" else max(2, a.steps // 4))
                p32 = proj(t, b)
                rec["batched"].append({"batch": b, "kernel": kernel, "step_ms": t * 1e3, "step_32_ms": p32 * 1e3,
                                       "per_request_tok_s_32": b / p32, "sequential_tok_s_32": 1 / proj(seq, 1),
                                       "capture_s": cap})
                print(f"step n={n} B={b} {kernel}: {t * 1e3:.2f} ms ({a.layers} layers), projected 32 layers "
                      f"{p32 * 1e3:.2f} ms = {b / p32:.1f} tok/s per request "
                      f"({b / p32 * proj(seq, 1):.2f}x sequential); "
                      f"capture {cap:.2f} s", flush=True)
                del kv, st
        out["step"].append(rec)
        del cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--own", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget", type=float, default=50)
    ap.add_argument("--skip-steps", action="store_true")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="sweep the kernel's knobs (after the kernel comparison)")
    ap.add_argument("--out")
    ap.add_argument("--cpu-check", action="store_true", help="the step part on a tiny model on the CPU (no timing)")
    a = ap.parse_args()
    if a.cpu_check:
        global DEV, HKV, D
        DEV, HKV, D, PRESET["preset"] = torch.device("cpu"), 2, 16, "tiny-llama"
        a.skip_kernels = True
    t0 = time.perf_counter()
    out = {"device": torch.cuda.get_device_name(0) if DEV.type == "cuda" else "cpu", "torch": torch.__version__,
           "args": vars(a), "kernel": [], "sweep": [], "step": []}
    try:
        if not a.skip_kernels:
            kernels(a, t0, out)
        if a.sweep:
            sweep(a, t0, out)
        if not a.skip_steps:
            steps(a, t0, out)
    finally:
        out["wall_s"] = time.perf_counter() - t0
        print("JSON " + json.dumps(out), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

"""KIVI decode attention over the packed cache on a GPU: the earlier kernels (v1 below, v2 in
scripts/kivi_decode_v2.py) against ``scbench.kernels.kivi_decode.kivi_attention_triton`` (v3) with several tunings.

    python scripts/bench_kivi_kernel.py [--lengths 32768 131072] [--bits 2] [--variants "v2" "v3 asm2 pf1 r0 c264"]
                                        [--jobs 12] [--json F]

A variant: ``v1``, ``v2`` (its default tuning) or ``v3`` plus knobs (``asm`` 0/1/2/3, ``w`` warps, ``s``
stages, ``c`` programs, ``gp`` padded query rows, ``pf`` prefetch, ``r`` register cap; missing knobs from
``kivi_decode.TUNE``).
``--jobs``: compile the variants first in that many processes (Triton's on-disk cache), then time them here.

Llama-3.1-8B shape: 32 query / 8 KV heads, head_dim 128, bf16, batch 1, group 32, 32 + some residual rows. One
"step" = 32 layers, each with its own buffers (so nothing is served from L2), timed as a CUDA graph (median of 5
replays). ``GB`` = bytes a step must read (packed keys/values of the quantized rows, their scales and zero points,
the residual rows); ``TB/s`` = GB / time. ``err``: largest difference from ``kivi_attention_torch`` in float64
(layer 0).

results/perf/kivi_kernel_h200.{log,md}: this script's runs on an H200 (GPU queue).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from scbench.kernels import kivi_decode as kd


# --- the previous kernel (v1), verbatim, for the comparison ---

@triton.jit
def _kivi_kernel(Q, KP, KS, KZ, VP, VS, VZ, RK, RV, NQ, RS, RE, Part, Mx, Sm, scale, CQ, R, n_splits, split,
                 G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                 VGROUP: tl.constexpr, PREC: tl.constexpr):
    """Program (batch x KV head, split): splits < n_splits - 1 take quantized rows, the last the residual."""
    bh, sp = tl.program_id(0), tl.program_id(1)
    PER: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // PER
    LEVELS: tl.constexpr = (1 << BITS) - 1
    rows_q, cols = tl.arange(0, GP), tl.arange(0, D)
    q = tl.load(Q + bh * G * D + rows_q[:, None] * D + cols[None, :], mask=rows_q[:, None] < G, other=0.0)
    m = tl.full([GP], float("-inf"), tl.float32)
    total = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    nq = tl.load(NQ).to(tl.int32)
    rs = tl.load(RS).to(tl.int32)
    re = tl.load(RE).to(tl.int32)
    last = sp == n_splits - 1
    start = tl.where(last, 0, sp * split)
    end = tl.where(last, 0, tl.minimum(sp * split + split, nq))
    bh64 = bh.to(tl.int64)
    shift = ((cols % PER) * BITS).to(tl.uint8)
    for off in range(start, end, GROUP):  # one key group (GROUP rows) per iteration
        rows = off + tl.arange(0, GROUP)
        poff = bh64 * CQ * DB + rows[:, None].to(tl.int64) * DB + (cols // PER)[None, :]
        kq = (tl.load(KP + poff) >> shift[None, :]) & LEVELS
        kg = bh64 * (CQ // GROUP) * D + (off // GROUP) * D + cols
        k = kq.to(tl.float32) * tl.load(KS + kg).to(tl.float32)[None, :] + tl.load(KZ + kg).to(tl.float32)[None, :]
        sc = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PREC) * scale
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        vq = (tl.load(VP + poff) >> shift[None, :]) & LEVELS
        vg = bh64 * CQ * (D // VGROUP) + rows[:, None].to(tl.int64) * (D // VGROUP) + (cols // VGROUP)[None, :]
        v = (vq.to(tl.float32) * tl.load(VS + vg).to(tl.float32) + tl.load(VZ + vg).to(tl.float32)).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PREC)
        m = m_new
    rend = tl.where(last, re, rs)
    for off in range(rs, rend, 16):  # the residual rows, full precision
        rows = off + tl.arange(0, 16)
        inside = rows < rend
        roff = bh64 * R * D + rows[:, None].to(tl.int64) * D + cols[None, :]
        k = tl.load(RK + roff, mask=inside[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        sc = tl.where(inside[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        total = total * alpha + tl.sum(p, 1)
        v = tl.load(RV + roff, mask=inside[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m = m_new
    out = (bh * n_splits + sp) * GP + rows_q
    tl.store(Part + out[:, None] * D + cols[None, :], acc)
    tl.store(Mx + out, m)
    tl.store(Sm + out, total)


def kivi_attention_v1(q, kp, ks, kz, vp, vs, vz, rk, rv, nq, rs, re, *, bits: int, group: int, vgroup: int,
                          scale: float) -> torch.Tensor:
    """The Triton kernel (CUDA); same contract as ``kivi_attention_torch``. Needs group a power of two >= 16."""
    from scbench.kernels.combine import _combine_kernel

    b, hq, _, d = q.shape
    h, cq, r = rk.shape[1], kp.shape[2], rk.shape[2]
    g = hq // h
    split = max(256, -(-cq // 64 // group) * group)
    n_splits = -(-cq // split) + 1
    gp = max(16, triton.next_power_of_2(g))
    q3 = q.reshape(b * h, g, d).contiguous()
    part = torch.empty(b * h * n_splits * gp, d, dtype=torch.float32, device=q.device)
    mx = torch.empty(b * h * n_splits * gp, dtype=torch.float32, device=q.device)
    sm = torch.empty_like(mx)
    out = torch.empty(b * h, g, d, dtype=q.dtype, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _kivi_kernel[(b * h, n_splits)](q3, kp, ks, kz, vp, vs, vz, rk, rv, nq, rs, re, part, mx, sm, scale, cq, r, n_splits,
                                    split, G=g, GP=gp, D=d, BITS=bits, GROUP=group, VGROUP=vgroup, PREC=prec)
    _combine_kernel[(b * h, g)](part, mx, sm, out, n_splits, G=g, GP=gp, D=d,
                                NS=max(2, triton.next_power_of_2(n_splits)))
    return out.view(b, hq, 1, d)


def graph_ms(fn, reps: int = 5) -> float:
    fn()
    if DEV == "cpu":  # --smoke (Triton interpreter): one timed call, no graph
        return 0.0
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ms = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(b))
    return statistics.median(ms)


DEV = "cuda"


def layer_bufs(n, bits, group, h=8, d=128, res=40, dt=torch.bfloat16):
    """One layer's buffers (standard layout; the token-major values of v3 as a 12th entry): capacity a multiple of
    8 * group past n + res; nq = n quantized rows."""
    cap = -(-(n + res + group) // (8 * group)) * 8 * group
    db = d * bits // 8
    dev = DEV
    kp = torch.randint(0, 256, (1, h, cap, db), dtype=torch.uint8, device=dev)
    vp = torch.randint(0, 256, (1, h, cap, db), dtype=torch.uint8, device=dev)
    ks = torch.rand(1, h, cap // group, d, device=dev, dtype=dt) * 0.5
    kz = torch.randn(1, h, cap // group, d, device=dev, dtype=dt)
    vs = torch.rand(1, h, cap, d // group, device=dev, dtype=dt) * 0.5
    vz = torch.randn(1, h, cap, d // group, device=dev, dtype=dt)
    rk = torch.randn(1, h, cap, d, device=dev, dtype=dt)
    rv = torch.randn(1, h, cap, d, device=dev, dtype=dt)
    t = lambda x: torch.tensor([x], device=dev)  # noqa: E731
    nbytes = 2 * h * n * db + 2 * h * (n // group) * d * 2 + 2 * h * n * (d // group) * 2 + 2 * h * res * d * 2
    return (kp, ks, kz, vp, vs, vz, rk, rv, t(n), t(n), t(n + res), kd.values_to_words(vp, bits)), nbytes


def tune_of(name: str) -> dict:
    """"v3 asm3 tr0 w4" -> kivi_attention_triton's tuning keywords."""
    knobs = {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", name.removeprefix("v3"))}
    names = {"w": "num_warps", "s": "num_stages", "c": "ctas", "pf": "prefetch", "r": "maxnreg"}
    return {names.get(k, k): v for k, v in knobs.items()}


def make_fn(name, q, bits, group, scale):
    """Variant name -> fn(bufs) running one layer's attention."""
    if name == "v1":
        return lambda b: kivi_attention_v1(q, *b[:11], bits=bits, group=group, vgroup=group, scale=scale)
    if name == "v2":
        spec = importlib.util.spec_from_file_location("kivi_decode_v2", Path(__file__).with_name("kivi_decode_v2.py"))
        v2 = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(v2)
        return lambda b: v2.kivi_attention_triton(q, *b[:11], bits=bits, group=group, vgroup=group, scale=scale)
    tune = tune_of(name)
    return lambda b: kd.kivi_attention_triton(q, *b[:3], b[11], *b[4:11], bits=bits, group=group, vgroup=group,
                                              scale=scale, **tune)


def _compile_one(args):
    """Worker: run a variant once on one layer of each length (fills Triton's on-disk cache)."""
    name, lengths, bits = args
    try:
        torch.manual_seed(0)
        for n in lengths:
            bufs, _ = layer_bufs(n, bits, 32)
            q = torch.randn(1, 32, 1, 128, device=DEV, dtype=torch.bfloat16)
            if name.startswith("step"):  # "step<fuse> <tuning>": --step's kernels
                kd.TUNE.update(tune_of(name.split(" ", 1)[1]))
                kd.kivi_decode_step(q, *bufs[:3], bufs[11], *bufs[4:10], torch.tensor([n + 39], device=DEV),
                                    bits=bits, group=32, vgroup=32, scale=0.1, residual=32, triton_ok=True,
                                    fuse=int(name[4]))
            else:
                make_fn(name, q, bits, 32, 128 ** -0.5)(bufs)
        torch.cuda.synchronize()
        return name, ""
    except Exception as e:  # noqa: BLE001 - reported by the main process
        return name, f"{type(e).__name__}: {str(e)[:300]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--variants", nargs="+", default=["v2", "v3"])
    ap.add_argument("--jobs", type=int, default=0, help="parallel compile processes first (0: none)")
    ap.add_argument("--step", default="", help="also time kivi_decode_step (fuse 0/1/2) with this v3 tuning")
    ap.add_argument("--json")
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, float16: checks the script runs")
    args = ap.parse_args()
    global DEV
    dt = torch.bfloat16
    if args.smoke:
        DEV, dt = "cpu", torch.float16
        from triton.runtime import interpreter as ti  # loop bounds loaded from memory (1-element arrays), NumPy 2

        orig = ti._patch_lang_tensor
        ti._patch_lang_tensor = lambda tensor, scope: (orig(tensor, scope), scope.set_attr(
            tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0])))
    if args.jobs and not args.smoke:
        import multiprocessing as mp

        t0 = time.time()
        with mp.get_context("spawn").Pool(min(args.jobs, len(args.variants) + 3)) as pool:
            jobs = args.variants + ([f"step{f} {args.step}" for f in (0, 1, 2)] if args.step else [])
            for name, err in pool.imap_unordered(_compile_one, [(v, args.lengths, args.bits) for v in jobs]):
                if err:
                    print(f"compile {name}: {err}", flush=True)
        print(f"compiled {len(args.variants)} variants in {time.time() - t0:.1f} s", flush=True)
    group, scale = 32, 128 ** -0.5
    rows = []
    for n in args.lengths:
        layers = [layer_bufs(n, args.bits, group, dt=dt) for _ in range(args.layers)]
        gb = sum(x[1] for x in layers) / 1e9
        q = torch.randn(1, 32, 1, 128, device=DEV, dtype=dt)
        want = kd.kivi_attention_torch(q.double(), *[x.double() if x.is_floating_point() else x
                                                     for x in layers[0][0][:11]],
                                       bits=args.bits, group=group, vgroup=group, scale=scale)
        for name in args.variants:
            fn = make_fn(name, q, args.bits, group, scale)
            try:
                err = (fn(layers[0][0]).double() - want).abs().max().item()
                ms = graph_ms(lambda: [fn(b) for b, _ in layers])
            except Exception as e:  # noqa: BLE001 - a tuning that does not compile is reported, not fatal
                print(f"{n:>7} {name:<30} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            rows.append(dict(n=n, bits=args.bits, variant=name, ms_step=ms, gb=gb, tbps=gb / max(ms, 1e-9),
                             max_err=err))
            print(f"{n:>7} {name:<30} {ms:8.3f} ms/step ({args.layers} layers) {gb:6.3f} GB "
                  f"{gb / max(ms, 1e-9):6.2f} TB/s err {err:.2e}", flush=True)
        if args.step:  # one decode step's KIVI work: attention + flush/counters (residual not full: no writes)
            kd.TUNE.update(tune_of(args.step))
            at = torch.tensor([n + 39], device=DEV)  # made before the capture (no host copy inside it)
            for fuse in (0, 1, 2):
                name = f"step fuse={fuse} {args.step}"

                def step(b, fuse=fuse):
                    return kd.kivi_decode_step(q, *b[:3], b[11], *b[4:8], b[8], b[9], at, bits=args.bits,
                                               group=group, vgroup=group, scale=scale, residual=32, triton_ok=True,
                                               fuse=fuse)
                try:
                    err = (step(layers[0][0]).double() - want).abs().max().item()
                    ms = graph_ms(lambda: [step(b) for b, _ in layers])
                except Exception as e:  # noqa: BLE001
                    print(f"{n:>7} {name:<30} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append(dict(n=n, bits=args.bits, variant=name, ms_step=ms, gb=gb, tbps=gb / max(ms, 1e-9), max_err=err))
                print(f"{n:>7} {name:<30} {ms:8.3f} ms/step ({args.layers} layers) err {err:.2e}", flush=True)
        del layers
        if DEV == "cuda":
            torch.cuda.empty_cache()
    best = {}
    for r in rows:
        if r["variant"].startswith("v3") and r["max_err"] < 0.05 and (
                r["n"] not in best or r["ms_step"] < best[r["n"]]["ms_step"]):
            best[r["n"]] = r
    for n, r in best.items():
        print(f"best {n}: {r['variant']} {r['ms_step']:.3f} ms {r['tbps']:.2f} TB/s err {r['max_err']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

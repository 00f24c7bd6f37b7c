"""KIVI decode attention over the packed cache on a GPU: the previous kernel (v1, kept below for the comparison)
against ``scbench.kernels.kivi_decode.kivi_attention_triton`` with several tunings.

    python scripts/bench_kivi_kernel.py [--lengths 32768 131072] [--bits 2] [--json F]

Llama-3.1-8B shape: 32 query / 8 KV heads, head_dim 128, bf16, batch 1, group 32, 32 + some residual rows. One
"step" = 32 layers, each with its own buffers (so nothing is served from L2), timed as a CUDA graph (median of 5
replays). ``GB`` = bytes a step must read (packed keys/values of the quantized rows, their scales and zero points,
the residual rows); ``TB/s`` = GB / time. ``err``: largest difference from ``kivi_attention_torch`` in float64
(layer 0).

results/perf/kivi_kernel_h200.{log,md}: this script's run on an H200 (GPU queue, batch 1), when --unpack also held
4 and 5 (a pack=2 inline-asm pairing since removed: its error was 14x the others', wrong).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics

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
    """One layer's buffers: capacity a multiple of 8 * group past n + res; nq = n quantized rows."""
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
    return (kp, ks, kz, vp, vs, vz, rk, rv, t(n), t(n), t(n + res)), nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--ctas", type=int, nargs="+", default=[264, 528, 1056, 2112])
    ap.add_argument("--gp", type=int, nargs="+", default=[4, 8], help="padded query rows per KV head")
    ap.add_argument("--unpack", type=int, nargs="+", default=[0, 3], help="kivi_decode._decode's U")
    ap.add_argument("--prefetch", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--default-only", action="store_true", help="v1 and kivi_decode.TUNE only, no sweep")
    ap.add_argument("--json")
    ap.add_argument("--smoke", action="store_true", help="CPU, TRITON_INTERPRET=1, float16: checks the script runs")
    args = ap.parse_args()
    global DEV
    dt = torch.bfloat16
    if args.smoke:
        DEV, dt = "cpu", torch.float16
    group, scale = 32, 128 ** -0.5
    rows = []
    for n in args.lengths:
        layers = [layer_bufs(n, args.bits, group, dt=dt) for _ in range(args.layers)]
        gb = sum(x[1] for x in layers) / 1e9
        q = torch.randn(1, 32, 1, 128, device=DEV, dtype=dt)
        want = kd.kivi_attention_torch(q.double(), *[x.double() if x.is_floating_point() else x for x in layers[0][0]],
                                       bits=args.bits, group=group, vgroup=group, scale=scale)

        def new(name):
            t = {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", name)}
            return lambda bufs: kd.kivi_attention_triton(q, *bufs, bits=args.bits, group=group, vgroup=group,
                                                         scale=scale, num_warps=t["w"], num_stages=t["s"],
                                                         ctas=t["c"], gp=t["gp"], unpack=t["u"], prefetch=t["pf"])

        def measure(variants) -> None:
            for name, fn in variants.items():
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

        # phase 1: the kernel's structure (word width, prefetch) at one tuning; phase 2: padded query rows and
        # warps; phase 3: pipelining stages and programs; each around the previous phase's best correct variant
        measure({"v1": lambda bufs: kivi_attention_v1(q, *bufs, bits=args.bits, group=group, vgroup=group,
                                                      scale=scale)})
        if args.default_only:
            measure({"new (TUNE)": lambda bufs: kd.kivi_attention_triton(q, *bufs, bits=args.bits, group=group,
                                                                         vgroup=group, scale=scale)})
            del layers
            torch.cuda.empty_cache()
            continue

        def best() -> str:
            ok = [r for r in rows if r["n"] == n and r["variant"] != "v1" and r["max_err"] < 0.05]
            return min(ok, key=lambda r: r["ms_step"])["variant"] if ok else ""

        names = [f"new u{u} pf{pf} gp4 w4 s2 c528" for u in args.unpack for pf in args.prefetch]
        measure({x: new(x) for x in names})
        if best():
            up = best().rsplit(" gp", 1)[0]
            names = [f"{up} gp{gp} w{w} s2 c528" for gp in args.gp for w in args.warps]
            measure({x: new(x) for x in names if x not in {r["variant"] for r in rows if r["n"] == n}})
        if best():
            up = best().rsplit(" s", 1)[0]
            names = [f"{up} s{st} c{c}" for st in args.stages for c in args.ctas]
            measure({x: new(x) for x in names if x not in {r["variant"] for r in rows if r["n"] == n}})
        del layers
        torch.cuda.empty_cache()
    best = {}
    for r in rows:
        if r["variant"] != "v1" and r["max_err"] < 0.05 and (r["n"] not in best or r["ms_step"] < best[r["n"]]["ms_step"]):
            best[r["n"]] = r
    for n, r in best.items():
        print(f"best {n}: {r['variant']} {r['ms_step']:.3f} ms {r['tbps']:.2f} TB/s err {r['max_err']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu", "torch": torch.__version__,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

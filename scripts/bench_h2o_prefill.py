"""Time H2O's score accumulation against dense causal attention, one Llama-3.1-8B-shaped layer on a GPU.

    python scripts/bench_h2o_prefill.py [--lengths 32768 131072] [--sweep] [--out F]

Random bf16 Q/K/V (32 query heads, 8 KV heads, head_dim 128). Per length, median milliseconds (CUDA events,
after a compile/warm-up call): ``dense`` the harness's causal SDPA (scbench/kernels/dense.causal_attention),
``dense_lse`` the same forward returning each query's log-sum-exp (causal_attention_lse: the flash kernel),
``old`` the first kernels (scripts/h2o_scores_v1.py: log-sum-exp pass + column-sum pass), ``new`` the column-sum
pass over the forward's log-sum-exp (scbench/kernels/h2o_scores.py, its CONFIG tiles; ``--sweep``: other tiles
too), ``new_lse_pass`` the new kernels without a forward log-sum-exp (later turns). Ratios are (forward + scores)
/ dense. ``err`` compares the scores with the float32 reference (methods.h2o.accumulated_attention) on a small
size. Writes JSON (stdout, and --out).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from scbench.kernels import dense, h2o_scores
from scbench.methods.h2o import accumulated_attention

HQ, HKV, D = 32, 8, 128
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32  # the CPU smoke run: the interpreter has no bf16 dot
SWEEP = [dict(BM=bm, BN=bn, num_warps=nw, num_stages=ns, EXP=e) for bm, bn, nw, ns, e in
         [(64, 128, 4, 3, 0), (64, 128, 4, 2, 0), (64, 128, 4, 4, 0), (64, 64, 4, 4, 0)]]
SWEEP.append({**SWEEP[0], "maxnreg": 168})  # 3 blocks per SM instead of 2 (207 registers), if it does not spill
"""Column-sum tiles and exp2 units tried by ``--sweep`` (EXP: 0 special-function units, 1 FMA polynomial, 2 half each;
the first batch's 8- and 16-warp tiles and EXP 1 / 2 were slower: results/perf/h2o_prefill.md); lengths above
``--sweep-max`` try only the EXP variants of the default tiles."""


def timed(fn, repeats: int) -> float:
    fn()  # compile / warm up
    if not torch.cuda.is_available():  # a CPU smoke run (TRITON_INTERPRET=1, tiny --lengths): wall time
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats * 1e3
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def old_kernels():
    spec = importlib.util.spec_from_file_location("h2o_v1", Path(__file__).with_name("h2o_scores_v1.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def errors(old, sizes) -> dict:
    out = {}
    for n, w in sizes:
        g = torch.Generator(device=DEV).manual_seed(n)
        q, k, v = (torch.randn(1, h, t, D, device=DEV, dtype=DTYPE, generator=g)
                   for h, t in [(HQ, w), (HKV, n), (HKV, n)])
        want = accumulated_attention(k.float(), q.float())
        got = {"old": old.accumulated_attention_triton(k, q), "new_lse_pass": h2o_scores.accumulated_attention_triton(k, q)}
        if n == w:
            _, lse = dense.causal_attention_lse(q, k, v)
            got["new"] = h2o_scores.accumulated_attention_triton(k, q, lse=lse)
        out[f"{n}x{w}"] = {name: {"max_abs": (x - want).abs().max().item(),
                                  "max_rel": ((x - want).abs() / want.abs().clamp_min(1e-3)).max().item()}
                           for name, x in got.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-max", type=int, default=32768)
    ap.add_argument("--flash", action="store_true", help="also time the flash kernel and SDPA's backends")
    ap.add_argument("--out")
    old = old_kernels()
    ap.add_argument("--err-sizes", type=int, nargs="+", default=[2085, 2085, 3000, 301], help="n w pairs")
    args = ap.parse_args()
    sizes = list(zip(args.err_sizes[::2], args.err_sizes[1::2]))
    res = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__, "config": h2o_scores.CONFIG,
           "err": errors(old, sizes), "lengths": {}}
    print(json.dumps(res["err"]), flush=True)
    for n in args.lengths:
        g = torch.Generator(device=DEV).manual_seed(n)
        q = torch.randn(1, HQ, n, D, device=DEV, dtype=DTYPE, generator=g)
        k, v = (torch.randn(1, HKV, n, D, device=DEV, dtype=DTYPE, generator=g) for _ in range(2))
        r = {}
        r["dense"] = timed(lambda: dense.causal_attention(q, k, v), args.repeats)
        r["dense_lse"] = timed(lambda: dense.causal_attention_lse(q, k, v), args.repeats)
        try:
            torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)
            r["flash_gqa_native"] = True
        except RuntimeError as e:
            r["flash_gqa_native"] = f"error: {str(e)[:120]}"
        lse_k = torch.empty(1, HQ, n, device=DEV)  # the log-sum-exp pass's (the yardstick of the forward's)
        h2o_scores._lse_kernel[(HQ, triton_cdiv(n, 128))](q, k, lse_k, n, n, D**-0.5 * h2o_scores.LOG2E, HQ=HQ,
                                                           HKV=HKV, D=D, BM=128, BN=64, PREC="tf32", num_warps=8)
        ref = dense.causal_attention(q, k, v)
        for name, fn in [("flash", dense._lse_flash), ("cudnn", dense._lse_cudnn)][0 if args.flash else 1 :]:
            try:
                r[f"lse_{name}"] = timed(lambda: fn(q, k, v, None), args.repeats)
                o2, l2 = fn(q, k, v, None)
                r[f"lse_{name}_lse_max_diff"] = (l2.reshape(1, HQ, n) - lse_k).abs().max().item()
                r[f"lse_{name}_out_max_diff"] = (o2 - ref).abs().max().item()
                del o2, l2
            except Exception as e:  # noqa: BLE001 - not built, no GQA there, ...
                r[f"lse_{name}"] = f"error: {str(e)[:160]}"
        del ref
        out_l, lse = dense.causal_attention_lse(q, k, v)
        r["lse_from_forward"] = lse is not None
        if lse is None:
            lse = lse_k
        for name, be in [("flash", "FLASH_ATTENTION"), ("cudnn", "CUDNN_ATTENTION")] if args.flash else []:
            try:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel([getattr(SDPBackend, be)]):
                    r[f"sdpa_{name}"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True, enable_gqa=True), args.repeats)
            except RuntimeError as e:
                r[f"sdpa_{name}"] = f"error: {str(e)[:120]}"
        r["old"] = timed(lambda: old.accumulated_attention_triton(k, q), args.repeats)
        r["new"] = timed(lambda: h2o_scores.accumulated_attention_triton(k, q, lse=lse), args.repeats)
        r["new_lse_pass"] = timed(lambda: h2o_scores.accumulated_attention_triton(k, q), args.repeats)
        scores = h2o_scores.accumulated_attention_triton(k, q, lse=lse)
        r["new_sum_check"] = scores.sum().item() / (n * HQ)  # 1.0: every query's weights sum to one
        if args.sweep:
            r["sweep"] = []
            base = h2o_scores.CONFIG["bf16"]
            for cfg in SWEEP if n <= args.sweep_max else [{**base, "EXP": e} for e in (0, 1, 2)]:
                try:
                    t = timed(lambda: h2o_scores.accumulated_attention_triton(k, q, lse=lse, config=cfg), args.repeats)
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for this tile
                    t = f"error: {str(e)[:100]}"
                r["sweep"].append({**cfg, "ms": t})
                print(n, cfg, t, flush=True)
        r["ratio_old"] = (r["dense"] + r["old"]) / r["dense"]
        r["ratio_new"] = (r["dense_lse"] + r["new"]) / r["dense"]
        res["lengths"][n] = r
        print(n, json.dumps(r), flush=True)
        del q, k, v, out_l, lse, lse_k, scores
        if DEV == "cuda":
            torch.cuda.empty_cache()
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


if __name__ == "__main__":
    sys.exit(main())

"""Probe (GPU): what limits the sparse prefill fast paths at one length, to choose their settings.

    python scripts/probe_flex_ashape.py [--tokens 131072] [--out F]

With static compilation, on one Llama-3.1-8B attention layer (32 q / 8 kv heads, d=128, bf16), median ms of:
dense causal SDPA; A-shape (128 + 3,968, block mask prebuilt) under FlexAttention ``kernel_options`` sets
(``USE_TMA``, ``PRESCALE_QK``) with each set's largest difference from the default kernel; Tri-shape's 64 dense
last rows through masked SDPA vs ``flex._dense_rows``; and vertical-slash's per-head block-mask build (nearest
6,096 diagonals on 32 heads) with the block lists ordered by a stable argsort vs prefix sums + scatter.
Prints the numbers and ``best_options`` (the fastest A-shape option set) as one JSON line, written to --out.
results/perf/sparse_flex_options.json holds the run of an earlier version (it also tried ``ROWS_GUARANTEED_SAFE``:
NaN on these masks; and ``_dense_rows`` through FlexAttention's decoding kernel: it does not build for these
shapes). An older version compared table vs arithmetic mask_mod and tile sizes: results/perf/probe_flex_ashape.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from scbench.kernels import flex
from scbench.kernels import pattern as pat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sparse_prefill import timed as _timed  # noqa: E402  (median of CUDA-event timings, as the benchmark)

HQ, HKV, D = 32, 8, 128
OPTION_SETS = {
    "default": {},
    "tma": {"USE_TMA": True},
    "prescale": {"PRESCALE_QK": True},
    "tma+prescale": {"USE_TMA": True, "PRESCALE_QK": True},
}


def prefix_order(m: torch.Tensor) -> torch.Tensor:
    """The stable partition of flex._ordered (chosen blocks first) by prefix sums and one scatter."""
    j = torch.arange(m.shape[-1], dtype=torch.int32, device=m.device)
    c = m.cumsum(-1, dtype=torch.int32)
    dest = torch.where(m, c - 1, c[..., -1:] + j - c)
    return torch.empty_like(dest).scatter_(-1, dest.long(), j.expand_as(dest))


def timed(fn) -> float:
    return _timed(fn, 5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t = args.tokens
    dev = "cuda"
    flex.DYNAMIC = False
    q = torch.randn(1, HQ, t, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, HKV, t, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, HKV, t, D, device=dev, dtype=torch.bfloat16)
    fx = flex.compiled_flex()
    p = pat.band(t, t, 128, 3968, device=dev)
    bm = flex.block_mask(p)
    out = {}
    with torch.inference_mode():
        out["dense_sdpa"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        ref = fx(q, k, v, block_mask=bm, enable_gqa=True)
        for name, opts in OPTION_SETS.items():
            try:
                o = fx(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=opts or None)
                err = float((o.float() - ref.float()).abs().max())
                out[f"ashape {name}"] = timed(lambda: fx(q, k, v, block_mask=bm, enable_gqa=True,
                                                           kernel_options=opts or None))
                out[f"ashape {name} max_abs_diff"] = err
            except Exception as e:  # an option this build or GPU does not support
                out[f"ashape {name}"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
        del ref
        ql = q[:, :, -64:]
        mask = torch.ones(64, t, dtype=torch.bool, device=dev).tril(t - 64)
        out["rows64 sdpa_masked"] = timed(lambda: F.scaled_dot_product_attention(ql, k, v, attn_mask=mask,
                                                                                 enable_gqa=True))
        try:
            a = F.scaled_dot_product_attention(ql, k, v, attn_mask=mask, enable_gqa=True)
            out["rows64 max_abs_diff"] = float((flex._dense_rows(ql, k, v, None).float() - a.float()).abs().max())
            out["rows64 flex_dense_rows"] = timed(lambda: flex._dense_rows(ql, k, v, None))
        except Exception as e:  # a kernel that does not build on this install
            out["rows64 flex_dense_rows"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        diags = torch.zeros(HQ, t, dtype=torch.bool, device=dev)
        diags[:, :6096] = True
        main = pat.Pattern(t, t, torch.zeros_like(diags), diags)
        out["vs block_mask build"] = timed(lambda: flex.block_mask(main))
        nb = -(-t // flex.BLOCK)
        m = torch.rand(HQ, nb, nb, device=dev) < 0.1
        out["order argsort"] = timed(lambda: flex._ordered(m))
        out["order prefix_sums"] = timed(lambda: prefix_order(m))
        out["order identical"] = torch.equal(prefix_order(m), flex._ordered(m)[1][0])
    timings = {n: out[f"ashape {n}"] for n in OPTION_SETS if isinstance(out[f"ashape {n}"], float)}
    best = min(timings, key=timings.get)
    out["best_options"] = OPTION_SETS[best]
    for name, ms in out.items():
        print(f"{name:40s} {ms if not isinstance(ms, float) else f'{ms:9.3f}'}")
    line = json.dumps({"tokens": t, "device": torch.cuda.get_device_name(), "torch": torch.__version__, **out})
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()

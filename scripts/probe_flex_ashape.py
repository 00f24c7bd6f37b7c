"""Probe (GPU): A-shape attention at one length with FlexAttention variants, to choose the fast path.

    python scripts/probe_flex_ashape.py [--tokens 131072]

Compares, with static compilation: the analytic block lists with the general table-lookup mask_mod, the same
lists with the arithmetic mask_mod (what band patterns use since this probe), a bare
``create_block_mask(_compile=True)`` mask (GPU_NOTES.md's baseline), and a few kernel_options tile settings.
Prints median milliseconds and writes the JSON line to --out when given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from scbench.kernels import flex
from scbench.kernels import pattern as pat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sparse_prefill import timed  # noqa: E402  (median of CUDA-event timings, shared with the benchmark)

HQ, HKV, D = 32, 8, 128



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    t = args.tokens
    dev = "cuda"
    q = torch.randn(1, HQ, t, D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, HKV, t, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(1, HKV, t, D, device=dev, dtype=torch.bfloat16)
    fx = torch.compile(flex_attention, dynamic=False)
    p = pat.band(t, t, 128, 3968, device=dev)
    bm = flex.block_mask(dataclasses.replace(p, band=None))  # table-lookup mask_mod

    def arith(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((kv_idx < 128) | (q_idx - kv_idx < 3968))

    bm_arith = flex._from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices,
                                    mask_mod=arith, seq_lengths=(t, t))
    out = {}
    with torch.inference_mode():
        out["dense_sdpa"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        out["lists_table_mod"] = timed(lambda: fx(q, k, v, block_mask=bm, enable_gqa=True))
        out["lists_arith_mod"] = timed(lambda: fx(q, k, v, block_mask=bm_arith, enable_gqa=True))
        bare = create_block_mask(arith, None, None, t, t, device=dev, _compile=True)
        out["bare_create_block_mask"] = timed(lambda: fx(q, k, v, block_mask=bare, enable_gqa=True))
        out["create_block_mask_ms"] = timed(lambda: create_block_mask(arith, None, None, t, t, device=dev,
                                                                      _compile=True))
        for opts in ({"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
                     {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
                     {"BLOCK_M": 64, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3}):
            name = "opts " + ",".join(f"{a}={b}" for a, b in opts.items())
            try:
                out[name] = timed(lambda: fx(q, k, v, block_mask=bm_arith, enable_gqa=True, kernel_options=opts))
            except Exception as e:  # an invalid tile setting for this GPU
                out[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    for name, ms in out.items():
        print(f"{name:60s} {ms if isinstance(ms, str) else f'{ms:9.2f} ms'}")
    line = json.dumps({"tokens": t, "device": torch.cuda.get_device_name(), "torch": torch.__version__, **out})
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")


if __name__ == "__main__":
    main()

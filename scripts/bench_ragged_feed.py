"""A later turn's query feed over a ragged layer (AdaKV / KVzip / DuoAttention caches) on CUDA: one batched-decode
kernel call (``kv.ragged.ragged_feed``) vs one concatenation + attention call per KV head (the plain path); Llama-3.1-8B
KV shape (8 KV heads x 128, 32 query heads), bf16, a 50-token feed on a 100-token suffix. Prints ms per layer and x32.

    python -P scripts/bench_ragged_feed.py [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kvzip_duo import events as timed  # noqa: E402 (CUDA-event timing, mean ms per call)
from scbench.kv import ragged  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    a = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    cases = {"adakv-like 32K (budget 4096 per head on average)": [2048, 6144, 3000, 5192, 4096, 4096, 1024, 7168],
             "duo-like 131K (4 retrieval heads, 4 x 3,968 + 128)": [131072] * 4 + [4096] * 4}
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": []}
    for name, lengths in cases.items():
        layer = ragged.RaggedLayer([torch.randn(n, 128, device="cuda", dtype=torch.bfloat16, generator=g) for n in lengths],
                                   [torch.randn(n, 128, device="cuda", dtype=torch.bfloat16, generator=g) for n in lengths])
        layer.update(*torch.randn(2, 1, 8, 150, 128, device="cuda", dtype=torch.bfloat16, generator=g))
        q = torch.randn(1, 32, 50, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        fast = ragged.ragged_feed(q, layer)

        def plain():
            lim = ragged.FEED_ROWS
            ragged.FEED_ROWS = -1
            try:
                return ragged.ragged_attention(q, layer)
            finally:
                ragged.FEED_ROWS = lim
        slow = plain()
        row = {"case": name, "kernel_ms_layer": round(timed(lambda: ragged.ragged_feed(q, layer), 20), 3),
               "per_head_ms_layer": round(timed(plain, 20), 3),
               "max_abs_diff": float((fast.float() - slow.float()).abs().max())}
        row["kernel_ms_32_layers"], row["per_head_ms_32_layers"] = round(32 * row["kernel_ms_layer"], 1), round(32 * row["per_head_ms_layer"], 1)
        print(json.dumps(row), flush=True)
        report["results"].append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()

"""KIVI's query-feed de-quantisation per layer (CUDA): the torch path (``scbench.kv.quant.dequantize`` per chunk +
concatenation) vs one kernel per chunk into a preallocated tensor (``KIVILayer.dequantized`` on CUDA,
scbench/kernels/kivi_dequant.py); Llama-3.1-8B's KV shape (8 KV heads x 128), bf16, 2 bits, group 32, a context
packed as one chunk plus a few decode chunks. Prints ms per layer and for 32 layers, writes JSON with --out.

    python -P scripts/bench_kivi_dequant.py --lengths 32000 131000 [--out F.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kvzip_duo import events as timed  # noqa: E402 (CUDA-event timing, mean ms per call)
from scbench.kv.quant import KIVILayer, dequantize  # noqa: E402


def torch_path(layer: KIVILayer):
    ks = [dequantize(*c, layer.bits, layer.group, -2, layer.dtype) for c in layer.kchunks]
    vs = [dequantize(*c, layer.bits, layer.value_group, -1, layer.dtype) for c in layer.vchunks]
    return torch.cat([*ks, layer.keys], dim=-2), torch.cat([*vs, layer.values], dim=-2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[32000, 131000])
    ap.add_argument("--out")
    a = ap.parse_args()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": []}
    for n in a.lengths:
        k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16)
        layer = KIVILayer(k, torch.randn_like(k), bits=2, group=32, residual=32)
        del k
        for _ in range(3):  # decode turns: more chunks, as a later turn's layer holds
            for _ in range(64):
                layer.update(*torch.randn(2, 1, 8, 1, 128, device="cuda", dtype=torch.bfloat16))
        want = torch_path(layer)
        got = layer.dequantized()
        same = all(torch.equal(x, y) for x, y in zip(want, got))
        t_torch, t_kernel = timed(lambda: torch_path(layer), 10), timed(layer.dequantized, 10)
        row = {"length": n, "chunks": len(layer.kchunks), "torch_ms_layer": round(t_torch, 3),
               "kernel_ms_layer": round(t_kernel, 3), "torch_ms_32_layers": round(32 * t_torch, 1),
               "kernel_ms_32_layers": round(32 * t_kernel, 1), "bit_identical": same}
        print(json.dumps(row), flush=True)
        report["results"].append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
